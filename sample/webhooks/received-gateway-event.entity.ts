import { Column, Entity, PrimaryColumn } from 'typeorm';

/**
 * The shop's record of each gateway event it acted on: one row per event id. The primary key is
 * the last line of defence only: `@Idempotent()` on the receiver is what runs the handler once per
 * event, and `handler_runs` shows it (a second run would add to it instead of adding a row).
 */
@Entity({ name: 'received_gateway_events' })
export class ReceivedGatewayEvent {
  @PrimaryColumn({ name: 'event_id', type: 'varchar', length: 64 })
  eventId!: string;

  @Column({ type: 'varchar', length: 64 })
  type!: string;

  /** The charge (or other object) the event is about. */
  @Column({ name: 'object_id', type: 'varchar', length: 64 })
  objectId!: string;

  @Column({ type: 'integer', nullable: true })
  amount!: number | null;

  @Column({ type: 'varchar', length: 3, nullable: true })
  currency!: string | null;

  /** When the gateway created the event (its `created`): events can arrive out of order. */
  @Column({ name: 'event_created_at', type: 'timestamptz' })
  eventCreatedAt!: Date;

  /** How many times the handler's work committed for this event: 1 unless deduplication failed. */
  @Column({ name: 'handler_runs', type: 'integer' })
  handlerRuns!: number;

  @Column({ name: 'received_at', type: 'timestamptz' })
  receivedAt!: Date;
}

/** `GET /webhooks/gateway/events`: the API's view of a received event. */
export function toReceivedEventView(event: ReceivedGatewayEvent) {
  return {
    event_id: event.eventId,
    type: event.type,
    object_id: event.objectId,
    amount: event.amount,
    currency: event.currency,
    event_created_at: event.eventCreatedAt.toISOString(),
    handler_runs: event.handlerRuns,
    received_at: event.receivedAt.toISOString(),
  };
}
