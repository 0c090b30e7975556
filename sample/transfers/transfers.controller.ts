import { Body, Controller, Get, Param, Post } from '@nestjs/common';
import { Idempotent } from '../../lib/index.js';
import {
  requireDifferent,
  requireObject,
  requirePositiveInteger,
  requireText,
} from '../common/request.validation.js';
import {
  TransfersService,
  type AccountView,
  type MakeTransfer,
  type TransferView,
} from './transfers.service.js';

@Controller()
export class TransfersController {
  constructor(private readonly transfers: TransfersService) {}

  /**
   * A retried transfer must not move the money twice; a refused one replays its 409. Transactional:
   * the balances, the transfer row and the stored response commit in one transaction, so even a
   * crash between the money moving and the response being stored cannot move it twice.
   */
  @Post('transfers')
  @Idempotent({ transactional: true })
  transfer(@Body() body: unknown): Promise<TransferView> {
    return this.transfers.transfer(parseMakeTransfer(body));
  }

  /**
   * For the demo only: the same transfer in the plain mode, where the money commits before the
   * response is stored. A crash in between, and the retry moves it again.
   */
  @Post('transfers/plain-mode')
  @Idempotent()
  transferPlainMode(@Body() body: unknown): Promise<TransferView> {
    return this.transfers.transfer(parseMakeTransfer(body));
  }

  @Get('accounts/:id')
  account(@Param('id') id: string): Promise<AccountView> {
    return this.transfers.account(id);
  }
}

export function parseMakeTransfer(body: unknown): MakeTransfer {
  const input = requireObject(body);
  const fromAccount = requireText(input.from_account, 'from_account', 64);
  const toAccount = requireText(input.to_account, 'to_account', 64);
  requireDifferent(fromAccount, toAccount, 'to_account');
  return { fromAccount, toAccount, amount: requirePositiveInteger(input.amount, 'amount') };
}
