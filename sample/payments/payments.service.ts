import { Inject, Injectable } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { IdempotencyContext } from '../../lib/index.js';
import { PaymentGatewayService } from '../gateway/payment-gateway.service.js';
import { Payment, toPaymentView } from './payment.entity.js';

export interface CreatePayment {
  amount: number;
  currency: string;
  source: string;
  reference: string | null;
}

export type PaymentView = ReturnType<typeof toPaymentView>;

@Injectable()
export class PaymentsService {
  constructor(
    @Inject(DataSource) private readonly dataSource: DataSource,
    private readonly gateway: PaymentGatewayService,
    private readonly idempotency: IdempotencyContext,
  ) {}

  /**
   * Charges the card, then records the payment. `@Idempotent()` on the route makes sure a retried
   * request does not get here a second time while the first is alive or done. One case is left: the
   * process dies during the gateway call, after the money moved; the retry then takes the key over
   * and gets here again. So the charge carries a key of its own, derived from the payment's
   * operation: the same on every retry, so the gateway answers with the first charge. (Called
   * without an idempotency key — the demo's unprotected route — it sends none.)
   */
  async create(request: CreatePayment): Promise<PaymentView> {
    const chargeKey = this.idempotency.operation
      ? this.idempotency.downstreamKey('charge')
      : undefined;
    const charge = await this.gateway.charge(request, chargeKey);
    const payment = this.dataSource.getRepository(Payment).create({
      id: `pay_${randomUUID()}`,
      amount: request.amount,
      currency: request.currency,
      source: request.source,
      status: charge.status,
      reference: request.reference,
      gatewayChargeId: charge.id,
      createdAt: new Date(),
    });
    await this.dataSource.getRepository(Payment).insert(payment);
    return toPaymentView(payment);
  }

  async list(): Promise<PaymentView[]> {
    const payments = await this.dataSource
      .getRepository(Payment)
      .find({ order: { createdAt: 'ASC', id: 'ASC' } });
    return payments.map(toPaymentView);
  }
}
