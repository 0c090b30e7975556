import { Body, Controller, Get, Post } from '@nestjs/common';
import { ApiCreatedResponse, ApiOkResponse, ApiTags } from '@nestjs/swagger';
import { Idempotent } from '../../lib/index.js';
import { CreatePaymentDto } from './create-payment.dto.js';
import { PaymentsService, type PaymentView } from './payments.service.js';

@ApiTags('payments')
@Controller('payments')
export class PaymentsController {
  constructor(private readonly payments: PaymentsService) {}

  /**
   * `concurrency: 'wait'`: a client that timed out usually retries at once, while its first
   * attempt is still at the gateway. Rather than a 409 it then gets that attempt's own result as
   * soon as it is ready. Without a key the request is refused (400): a charge is never unprotected.
   */
  @Post()
  @Idempotent({ concurrency: 'wait' })
  @ApiCreatedResponse({
    description: 'The payment, charged once (a declined card is a stored 402).',
  })
  create(@Body() payment: CreatePaymentDto): Promise<PaymentView> {
    return this.payments.create(payment.toCommand());
  }

  /**
   * For the demo only, to show what happens without the library: the same handler with no
   * `@Idempotent()`, so every retry is a new charge. A real API would not have this route.
   */
  @Post('unprotected')
  @ApiCreatedResponse({ description: 'A new payment on every call: the demo of what goes wrong.' })
  createUnprotected(@Body() payment: CreatePaymentDto): Promise<PaymentView> {
    return this.payments.create(payment.toCommand());
  }

  /** Every payment, oldest first: count them to see whether a retry charged twice. */
  @Get()
  @ApiOkResponse({ description: 'Every payment, oldest first.' })
  list(): Promise<PaymentView[]> {
    return this.payments.list();
  }
}
