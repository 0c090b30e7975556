import { Body, Controller, Get, Post } from '@nestjs/common';
import { Idempotent } from '../../lib/index.js';
import {
  optionalText,
  requireCurrency,
  requireObject,
  requirePositiveInteger,
  requireText,
} from '../common/request.validation.js';
import { PaymentsService, type CreatePayment, type PaymentView } from './payments.service.js';

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
  create(@Body() body: unknown): Promise<PaymentView> {
    return this.payments.create(parseCreatePayment(body));
  }

  /**
   * For the demo only, to show what happens without the library: the same handler with no
   * `@Idempotent()`, so every retry is a new charge. A real API would not have this route.
   */
  @Post('unprotected')
  createUnprotected(@Body() body: unknown): Promise<PaymentView> {
    return this.payments.create(parseCreatePayment(body));
  }

  /** Every payment, oldest first: count them to see whether a retry charged twice. */
  @Get()
  list(): Promise<PaymentView[]> {
    return this.payments.list();
  }
}

export function parseCreatePayment(body: unknown): CreatePayment {
  const input = requireObject(body);
  return {
    amount: requirePositiveInteger(input.amount, 'amount'),
    currency: requireCurrency(input.currency),
    source: requireText(input.source, 'source', 64),
    reference: optionalText(input.reference, 'reference', 100),
  };
}
