import { Inject, Injectable, Logger, type OnModuleDestroy } from '@nestjs/common';
import { createHmac, randomInt, randomUUID } from 'node:crypto';
import { DataSource, IsNull, LessThan, LessThanOrEqual, type EntityManager } from 'typeorm';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import {
  GatewayWebhookAttempt,
  GatewayWebhookEvent,
  type WebhookCopy,
} from './gateway-webhook.entity.js';

/** How often the sender looks for due events. */
const POLL_INTERVAL_MS = 200;
/** A copy not answered by then counts as failed (the receiver's `concurrency: 'wait'` is 10 s). */
const DELIVERY_TIMEOUT_MS = 15_000;
/** Rounds before the gateway gives up on an event (Stripe keeps trying for three days). */
const MAX_ATTEMPTS = 12;
/** The late duplicate of a first round goes this long after it, at random: out of order. */
const LATE_DUPLICATE_MS = [300, 1500] as const;

/** The wait before round `attempt + 1`: 0.5 s, doubling, at most 30 s. */
export function webhookBackoffMs(attempt: number): number {
  return Math.min(30_000, 500 * 2 ** (attempt - 1));
}

/**
 * The gateway's signature, in Stripe's format: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
 * "<t>.<body>">` under the endpoint's secret. Each copy is signed when it is sent, so a retry days
 * later still carries a fresh timestamp.
 */
export function signWebhook(body: string, secret: string, at: Date = new Date()): string {
  const timestamp = Math.floor(at.getTime() / 1000);
  const signature = createHmac('sha256', secret).update(`${timestamp}.${body}`).digest('hex');
  return `t=${timestamp},v1=${signature}`;
}

/** What the gateway's dashboard shows of one event: every copy sent and what it was answered. */
export interface WebhookEventView {
  id: string;
  type: string;
  /** The charge the event is about. */
  object_id: string;
  created_at: string;
  delivered_at: string | null;
  attempts: number;
  copies: {
    copy: WebhookCopy;
    status: number;
    replayed: boolean;
    response: string;
    sent_at: string;
  }[];
}

/**
 * The simulated gateway as a webhook sender, as real ones behave: at least once, so a receiver
 * must deduplicate. After a charge it owes the shop a `charge.succeeded` event (written to its
 * outbox with the charge). The first round sends two copies at once (concurrent duplicates), and
 * a third copy follows a little later whatever the answers (a late duplicate, arriving after
 * other events: out of order); due events are taken in random order. Any answer but a 2xx (or
 * none) is retried with backoff; the outbox survives a restart of either side, so an event whose
 * delivery a crash cut short is sent again once the process is back.
 *
 * Started by `main.ts` once the shop listens (`start(url)`); an app that never calls it only
 * fills the outbox.
 */
@Injectable()
export class GatewayWebhookSender implements OnModuleDestroy {
  private readonly logger = new Logger('GatewayWebhooks');
  private target: string | undefined;
  private timer: NodeJS.Timeout | undefined;
  private polling = false;
  /** Events with a round running in this process: not taken again until it ends. */
  private readonly inFlight = new Set<string>();
  private readonly running = new Set<Promise<unknown>>();
  private readonly lateCopies = new Set<NodeJS.Timeout>();
  private readonly stopped = new AbortController();

  constructor(
    @Inject(SAMPLE_CONFIG) private readonly config: SampleConfig,
    @Inject(DataSource) private readonly dataSource: DataSource,
  ) {}

  /** Adds an event to the outbox, in the caller's transaction: it commits with the charge. */
  async enqueue(manager: EntityManager, type: string, object: object): Promise<string> {
    const id = `evt_${randomUUID()}`;
    const now = new Date();
    const body = JSON.stringify({
      id,
      object: 'event',
      type,
      created: Math.floor(now.getTime() / 1000),
      data: { object },
    });
    await manager.insert(GatewayWebhookEvent, {
      id,
      type,
      body,
      attempts: 0,
      nextAttemptAt: now,
      deliveredAt: null,
      createdAt: now,
    });
    return id;
  }

  /** Starts delivering due events to `url` (the shop's `POST /webhooks/gateway`). */
  start(url: string): void {
    if (this.timer) throw new Error('The webhook sender is already started');
    this.target = url;
    this.timer = setInterval(() => void this.deliverDue(), POLL_INTERVAL_MS);
    void this.deliverDue();
  }

  /** Stops sending: copies in flight are abandoned (the outbox sends them again next time). */
  async onModuleDestroy(): Promise<void> {
    clearInterval(this.timer);
    for (const timer of this.lateCopies) clearTimeout(timer);
    this.stopped.abort();
    await Promise.allSettled([...this.running]);
  }

  /** The dashboard: every event, oldest first, with its copies. */
  async events(): Promise<WebhookEventView[]> {
    const [events, attempts] = await Promise.all([
      this.dataSource
        .getRepository(GatewayWebhookEvent)
        .find({ order: { createdAt: 'ASC', id: 'ASC' } }),
      this.dataSource
        .getRepository(GatewayWebhookAttempt)
        .find({ order: { sentAt: 'ASC', id: 'ASC' } }),
    ]);
    const copiesOf = new Map<string, GatewayWebhookAttempt[]>();
    for (const attempt of attempts) {
      copiesOf.set(attempt.eventId, [...(copiesOf.get(attempt.eventId) ?? []), attempt]);
    }
    return events.map((event) => ({
      id: event.id,
      type: event.type,
      object_id: (JSON.parse(event.body) as { data: { object: { id: string } } }).data.object.id,
      created_at: event.createdAt.toISOString(),
      delivered_at: event.deliveredAt?.toISOString() ?? null,
      attempts: event.attempts,
      copies: (copiesOf.get(event.id) ?? []).map((attempt) => ({
        copy: attempt.copy,
        status: attempt.status,
        replayed: attempt.replayed,
        response: attempt.response,
        sent_at: attempt.sentAt.toISOString(),
      })),
    }));
  }

  private async deliverDue(): Promise<void> {
    if (this.polling || this.stopped.signal.aborted) return;
    this.polling = true;
    try {
      const due = await this.dataSource.getRepository(GatewayWebhookEvent).find({
        where: {
          deliveredAt: IsNull(),
          nextAttemptAt: LessThanOrEqual(new Date()),
          attempts: LessThan(MAX_ATTEMPTS),
        },
        order: { nextAttemptAt: 'ASC' },
        take: 20,
      });
      for (const event of shuffled(due)) {
        if (this.inFlight.has(event.id) || this.stopped.signal.aborted) continue;
        this.track(this.round(event));
      }
    } catch (error) {
      if (!this.stopped.signal.aborted)
        this.logger.warn(`Could not read the outbox: ${(error as Error).message}`);
    } finally {
      this.polling = false;
    }
  }

  /** One delivery round: two copies at once the first time, one on each retry. */
  private async round(event: GatewayWebhookEvent): Promise<void> {
    this.inFlight.add(event.id);
    try {
      const repository = this.dataSource.getRepository(GatewayWebhookEvent);
      const attempt = event.attempts + 1;
      const retryAt = () => new Date(Date.now() + webhookBackoffMs(attempt));
      // Recorded before sending: a crash mid-round leaves the event due again, as a retry.
      await repository.update({ id: event.id }, { attempts: attempt, nextAttemptAt: retryAt() });
      const copies: WebhookCopy[] = attempt === 1 ? ['first', 'concurrent'] : ['retry'];
      const statuses = await Promise.all(copies.map((copy) => this.send(event, copy)));
      if (this.stopped.signal.aborted) return;
      if (statuses.some(isSuccess)) {
        await repository.update({ id: event.id }, { deliveredAt: new Date() });
      } else {
        await repository.update({ id: event.id }, { nextAttemptAt: retryAt() });
        if (attempt >= MAX_ATTEMPTS) this.logger.error(`Gave up on ${event.id}`);
      }
      if (attempt === 1) this.sendLateDuplicate(event);
    } catch (error) {
      if (!this.stopped.signal.aborted)
        this.logger.warn(`Delivery round of ${event.id} failed: ${(error as Error).message}`);
    } finally {
      this.inFlight.delete(event.id);
    }
  }

  private sendLateDuplicate(event: GatewayWebhookEvent): void {
    const timer = setTimeout(
      () => {
        this.lateCopies.delete(timer);
        this.track(this.send(event, 'late-duplicate'));
      },
      randomInt(...LATE_DUPLICATE_MS),
    );
    this.lateCopies.add(timer);
  }

  /** Sends one signed copy and records what came back; resolves with the status (0: none). */
  private async send(event: GatewayWebhookEvent, copy: WebhookCopy): Promise<number> {
    const sentAt = new Date();
    let status = 0;
    let replayed = false;
    let response: string;
    try {
      const answer = await fetch(this.target!, {
        method: 'POST',
        headers: {
          'Content-Type': 'application/json',
          'Stripe-Signature': signWebhook(event.body, this.config.webhookSecret, sentAt),
        },
        body: event.body,
        signal: AbortSignal.any([this.stopped.signal, AbortSignal.timeout(DELIVERY_TIMEOUT_MS)]),
      });
      status = answer.status;
      replayed = answer.headers.get('idempotent-replayed') === 'true';
      response = (await answer.text()).slice(0, 2000);
    } catch (error) {
      const { cause, message } = error as Error & { cause?: { code?: string } };
      response = cause?.code ?? message;
    }
    if (this.stopped.signal.aborted) return status;
    this.logger.log(
      `${event.type} ${event.id} (${copy} copy) → ${status || response}${replayed ? ', replayed' : ''}`,
    );
    await this.dataSource.getRepository(GatewayWebhookAttempt).insert({
      id: `wha_${randomUUID()}`,
      eventId: event.id,
      copy,
      status,
      replayed,
      response,
      sentAt,
    });
    return status;
  }

  private track(work: Promise<unknown>): void {
    const tracked = work.catch((error: Error) => {
      if (!this.stopped.signal.aborted) this.logger.warn(error.message);
    });
    this.running.add(tracked);
    void tracked.finally(() => this.running.delete(tracked));
  }
}

const isSuccess = (status: number) => status >= 200 && status < 300;

function shuffled<T>(items: T[]): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [copy[i], copy[j]] = [copy[j], copy[i]];
  }
  return copy;
}
