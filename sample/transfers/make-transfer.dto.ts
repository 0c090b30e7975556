import { ApiProperty } from '@nestjs/swagger';
import { IsInt, IsNotEmpty, IsString, Max, MaxLength, Min } from 'class-validator';
import { DiffersFrom, HasNoNulCharacter, Trim } from '../common/validation.js';
import type { MakeTransfer } from './transfers.service.js';

/** `POST /transfers` (and `/transfers/async`): move `amount` cents between two accounts. */
export class MakeTransferDto {
  @ApiProperty({ example: 'acc_alice', maxLength: 64 })
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(64)
  @HasNoNulCharacter()
  from_account!: string;

  @ApiProperty({ example: 'acc_bob', maxLength: 64 })
  @Trim()
  @IsString()
  @IsNotEmpty()
  @MaxLength(64)
  @HasNoNulCharacter()
  @DiffersFrom('from_account')
  to_account!: string;

  @ApiProperty({ example: 500, minimum: 1, maximum: 100_000_000 })
  @IsInt()
  @Min(1)
  @Max(100_000_000)
  amount!: number;

  toCommand(): MakeTransfer {
    return { fromAccount: this.from_account, toAccount: this.to_account, amount: this.amount };
  }
}
