import { Column, Entity, PrimaryColumn } from 'typeorm';

/** A charge that went through the (simulated) gateway. Declined cards leave no row. */
@Entity({ name: 'payments' })
export class Payment {
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  /** In the currency's smallest unit (cents), so no float rounding. */
  @Column({ type: 'integer' })
  amount!: number;

  @Column({ type: 'varchar', length: 3 })
  currency!: string;

  /** The card token, e.g. `tok_visa`. */
  @Column({ type: 'varchar', length: 64 })
  source!: string;

  @Column({ type: 'varchar', length: 16 })
  status!: 'succeeded';

  /** Free text of the caller's; the demo tags each scenario's payments with one to count them. */
  @Column({ type: 'varchar', length: 100, nullable: true })
  reference!: string | null;

  @Column({ name: 'gateway_charge_id', type: 'varchar', length: 64 })
  gatewayChargeId!: string;

  @Column({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;
}

/** The API's view of a payment (snake_case, like the request bodies). */
export function toPaymentView(payment: Payment) {
  return {
    id: payment.id,
    amount: payment.amount,
    currency: payment.currency,
    source: payment.source,
    status: payment.status,
    reference: payment.reference,
    created_at: payment.createdAt.toISOString(),
  };
}
