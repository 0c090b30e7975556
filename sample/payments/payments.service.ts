import { Inject, Injectable } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
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
  ) {}

  /**
   * Charges the card, then records the payment. Nothing here is idempotent by itself: called twice,
   * it charges twice. That is the point of the sample — `@Idempotent()` on the route makes sure a
   * retried request does not get here a second time.
   */
  async create(request: CreatePayment): Promise<PaymentView> {
    const charge = await this.gateway.charge(request);
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
