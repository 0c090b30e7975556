import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import {
  IsInt,
  IsNotEmpty,
  IsOptional,
  IsString,
  Matches,
  Max,
  MaxLength,
  Min,
} from 'class-validator';
import { HasNoNulCharacter, LowerCase, Trim } from '../common/validation.js';
import type { CreatePayment } from './payments.service.js';

/** `POST /payments`: what the client sends (checked by the global ValidationPipe). */
export class CreatePaymentDto {
  @ApiProperty({
    description: "The amount in the currency's smallest unit (cents): a whole number.",
    example: 1000,
    minimum: 1,
    maximum: 100_000_000,
  })
  @IsInt()
  @Min(1)
  @Max(100_000_000)
  amount!: number;

  @ApiProperty({ description: 'ISO 4217 code, any case; stored lower-case.', example: 'eur' })
  @LowerCase()
  @Matches(/^[a-z]{3}$/, { message: 'currency must be a three-letter ISO 4217 code, e.g. "eur"' })
  currency!: string;

  @ApiProperty({
    description: 'The card token. `card_declined` makes the gateway decline (a stored 402).',
    example: 'tok_visa',
    maxLength: 64,
  })
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(64)
  @HasNoNulCharacter()
  source!: string;

  @ApiPropertyOptional({ description: "The client's own reference.", maxLength: 100 })
  @IsOptional()
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(100)
  @HasNoNulCharacter()
  reference?: string;

  toCommand(): CreatePayment {
    return {
      amount: this.amount,
      currency: this.currency,
      source: this.source,
      reference: this.reference ?? null,
    };
  }
}

/** GraphQL's `createPayment` arguments: the same fields, and the key as an optional argument. */
export class CreatePaymentArgs extends CreatePaymentDto {
  @IsOptional()
  @IsString()
  idempotencyKey?: string;
}
