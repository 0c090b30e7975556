import { Column, Entity, Index, PrimaryColumn } from 'typeorm';

/**
 * The gateway's outbox: one row per event it owes its webhook endpoint, written in the transaction
 * of the charge it announces, so an event is never lost (nor sent for a charge that did not
 * happen). A row stays due until one of its copies got a 2xx; like the charges, it belongs to the
 * simulated gateway, not to the shop.
 */
@Entity({ name: 'gateway_webhook_events' })
@Index(['deliveredAt', 'nextAttemptAt'])
export class GatewayWebhookEvent {
  /** `evt_…`: the id a receiver deduplicates on. */
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  @Column({ type: 'varchar', length: 64 })
  type!: string;

  /** The JSON sent, serialised once: every copy and every retry carries the same bytes. */
  @Column({ type: 'text' })
  body!: string;

  /** How many delivery rounds have started (the first round sends two copies at once). */
  @Column({ type: 'integer', default: 0 })
  attempts!: number;

  @Column({ name: 'next_attempt_at', type: 'timestamptz' })
  nextAttemptAt!: Date;

  /** When a copy first got a 2xx; `null` while the event is still due. */
  @Column({ name: 'delivered_at', type: 'timestamptz', nullable: true })
  deliveredAt!: Date | null;

  @Column({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;
}

/** Which copy of an event a delivery was. */
export type WebhookCopy = 'first' | 'concurrent' | 'late-duplicate' | 'retry';

/** Every copy the gateway sent, with what the receiver answered: the sender's point of view. */
@Entity({ name: 'gateway_webhook_attempts' })
export class GatewayWebhookAttempt {
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  @Index()
  @Column({ name: 'event_id', type: 'varchar', length: 64 })
  eventId!: string;

  @Column({ type: 'varchar', length: 16 })
  copy!: WebhookCopy;

  /** The receiver's HTTP status; 0 when no answer came (refused, reset, timed out). */
  @Column({ type: 'integer' })
  status!: number;

  /** Whether the answer carried `Idempotent-Replayed: true`. */
  @Column({ type: 'boolean' })
  replayed!: boolean;

  /** The answer's body (its first 2000 characters), or the network error. */
  @Column({ type: 'text' })
  response!: string;

  @Column({ name: 'sent_at', type: 'timestamptz' })
  sentAt!: Date;
}
