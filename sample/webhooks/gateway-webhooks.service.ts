import { Inject, Injectable, Logger } from '@nestjs/common';
import { setTimeout as sleep } from 'node:timers/promises';
import { DataSource, type EntityManager } from 'typeorm';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import type { GatewayEventDto } from './gateway-event.dto.js';
import { ReceivedGatewayEvent, toReceivedEventView } from './received-gateway-event.entity.js';

/** What the receiver answers for an event: what every later copy of it gets replayed. */
export interface WebhookReceipt {
  received: true;
  event_id: string;
  type: string;
  /** When the handler ran: a replayed copy carries the first run's. */
  recorded_at: string;
}

export type ReceivedEventView = ReturnType<typeof toReceivedEventView>;

@Injectable()
export class GatewayWebhooksService {
  private readonly logger = new Logger('GatewayWebhooks');

  constructor(
    @Inject(DataSource) private readonly dataSource: DataSource,
    @Inject(SAMPLE_CONFIG) private readonly config: SampleConfig,
  ) {}

  /**
   * Acts on an event, through `manager` (the receiver's transaction, which also stores its
   * answer): a crash before the commit leaves neither, and the sender's retry runs this again as
   * a first time. Should a second run ever reach the INSERT for one event (it does not, under
   * `@Idempotent()`), the primary key keeps one row and `handler_runs` counts it.
   */
  async record(event: GatewayEventDto, manager: EntityManager): Promise<WebhookReceipt> {
    this.logger.log(`Handling ${event.type} ${event.id}`);
    const recordedAt = new Date();
    const object = event.data.object;
    await manager.query(
      `INSERT INTO received_gateway_events
         (event_id, type, object_id, amount, currency, event_created_at, handler_runs, received_at)
       VALUES ($1, $2, $3, $4, $5, $6, 1, $7)
       ON CONFLICT (event_id) DO UPDATE
         SET handler_runs = received_gateway_events.handler_runs + 1`,
      [
        event.id,
        event.type,
        object.id,
        object.amount ?? null,
        object.currency ?? null,
        new Date(event.created * 1000),
        recordedAt,
      ],
    );
    // The rest of the work (a receipt email, say), still inside the transaction.
    await sleep(this.config.webhookHandlerLatencyMs);
    return {
      received: true,
      event_id: event.id,
      type: event.type,
      recorded_at: recordedAt.toISOString(),
    };
  }

  /** Every event received, in the order they arrived. */
  async events(): Promise<ReceivedEventView[]> {
    const events = await this.dataSource
      .getRepository(ReceivedGatewayEvent)
      .find({ order: { receivedAt: 'ASC', eventId: 'ASC' } });
    return events.map(toReceivedEventView);
  }
}
