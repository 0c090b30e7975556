import { Column, Entity, PrimaryColumn } from 'typeorm';

/**
 * The simulated gateway's own ledger: every charge it made, as the card network sees it. It lives
 * in the sample's database only for convenience; think of it as another company's system.
 */
@Entity({ name: 'gateway_charges' })
export class GatewayCharge {
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  /** The caller's Idempotency-Key for this charge: a repeated key gets the first charge back. */
  @Column({ name: 'idempotency_key', type: 'varchar', length: 255, nullable: true, unique: true })
  idempotencyKey!: string | null;

  @Column({ type: 'integer' })
  amount!: number;

  @Column({ type: 'varchar', length: 3 })
  currency!: string;

  @Column({ type: 'varchar', length: 64 })
  source!: string;

  @Column({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;
}
