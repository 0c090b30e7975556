import { Body, Controller, Get, Param, Post } from '@nestjs/common';
import { ApiTags } from '@nestjs/swagger';
import { Idempotent } from '../../lib/index.js';
import { MakeTransferDto } from './make-transfer.dto.js';
import { TransfersService, type AccountView, type TransferView } from './transfers.service.js';

@ApiTags('transfers')
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
  transfer(@Body() transfer: MakeTransferDto): Promise<TransferView> {
    return this.transfers.transfer(transfer.toCommand());
  }

  /**
   * For the demo only: the same transfer in the plain mode, where the money commits before the
   * response is stored. A crash in between, and the retry moves it again.
   */
  @Post('transfers/plain-mode')
  @Idempotent()
  transferPlainMode(@Body() transfer: MakeTransferDto): Promise<TransferView> {
    return this.transfers.transfer(transfer.toCommand());
  }

  @Get('accounts/:id')
  account(@Param('id') id: string): Promise<AccountView> {
    return this.transfers.account(id);
  }
}
