import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { Type } from 'class-transformer';
import {
  IsInt,
  IsOptional,
  IsString,
  Matches,
  MaxLength,
  Min,
  ValidateNested,
} from 'class-validator';
import { HasNoNulCharacter } from '../common/validation.js';

/** The object an event is about (a charge): only what the shop reads of it. */
export class GatewayEventObjectDto {
  @ApiProperty({ example: 'ch_3f1c…', maxLength: 64 })
  @IsString()
  @MaxLength(64)
  @HasNoNulCharacter()
  id!: string;

  @ApiPropertyOptional({ example: 1000 })
  @IsOptional()
  @IsInt()
  amount?: number;

  @ApiPropertyOptional({ example: 'eur' })
  @IsOptional()
  @Matches(/^[a-z]{3}$/)
  currency?: string;
}

export class GatewayEventDataDto {
  @ApiProperty({ type: GatewayEventObjectDto })
  @ValidateNested()
  @Type(() => GatewayEventObjectDto)
  object!: GatewayEventObjectDto;
}

/** `POST /webhooks/gateway`: a Stripe-shaped event (`id`, `type`, `created`, `data.object`). */
export class GatewayEventDto {
  /** The event's id, the same on every copy and retry: the idempotency key. */
  @ApiProperty({ example: 'evt_0b6e…', maxLength: 64 })
  @Matches(/^evt_[A-Za-z0-9_-]{1,60}$/, { message: 'id must be an event id (evt_…)' })
  id!: string;

  @ApiProperty({ example: 'charge.succeeded', maxLength: 64 })
  @IsString()
  @MaxLength(64)
  @HasNoNulCharacter()
  type!: string;

  /** Unix seconds. */
  @ApiProperty({ example: 1767225600 })
  @IsInt()
  @Min(0)
  created!: number;

  @ApiProperty({ type: GatewayEventDataDto })
  @ValidateNested()
  @Type(() => GatewayEventDataDto)
  data!: GatewayEventDataDto;
}
