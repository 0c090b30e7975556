import { ApiProperty } from '@nestjs/swagger';
import { Type } from 'class-transformer';
import {
  ArrayMaxSize,
  ArrayNotEmpty,
  IsArray,
  IsInt,
  IsNotEmpty,
  IsString,
  Max,
  MaxLength,
  Min,
  ValidateNested,
} from 'class-validator';
import { HasNoNulCharacter, Trim } from '../common/validation.js';
import type { PlaceOrder } from './orders.service.js';

export class OrderItemDto {
  @ApiProperty({ example: 'sku_tea', maxLength: 64 })
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(64)
  @HasNoNulCharacter()
  sku!: string;

  @ApiProperty({ example: 2, minimum: 1, maximum: 1000 })
  @IsInt()
  @Min(1)
  @Max(1000)
  quantity!: number;
}

/** `POST /orders`: a customer and 1–50 items. */
export class PlaceOrderDto {
  @ApiProperty({ example: 'alice', maxLength: 100 })
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(100)
  @HasNoNulCharacter()
  customer!: string;

  @ApiProperty({ type: [OrderItemDto], minItems: 1, maxItems: 50 })
  @IsArray()
  @ArrayNotEmpty()
  @ArrayMaxSize(50)
  @ValidateNested({ each: true })
  @Type(() => OrderItemDto)
  items!: OrderItemDto[];

  toCommand(): PlaceOrder {
    return {
      customer: this.customer,
      items: this.items.map(({ sku, quantity }) => ({ sku, quantity })),
    };
  }
}
