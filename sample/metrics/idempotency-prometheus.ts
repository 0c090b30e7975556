import { Injectable, type OnModuleDestroy } from '@nestjs/common';
import { collectDefaultMetrics, Counter, Registry } from 'prom-client';
import { IdempotencyMetrics, type IdempotencyEvent } from '../../lib/index.js';

/** The events that are the outcome of a request's key; the others count keys and records. */
const REQUEST_OUTCOMES = ['executed', 'replayed', 'conflict', 'mismatch'] as const;

/**
 * The library's counters as Prometheus metrics, in a registry of this app's own (not prom-client's
 * global one, so several apps in one process, as in the tests, do not collide):
 *
 * - `idempotency_requests_total{outcome}`: executed (ran the handler), replayed, conflict (409),
 *   mismatch (422);
 * - `idempotency_keys_released_total`: keys given up after a result that is not stored;
 * - `idempotency_records_expired_total`: claims that took over an expired or abandoned record;
 * - `idempotency_leases_lost_total`: running handlers whose claim was found taken over;
 * - `idempotency_records_purged_total`: rows deleted by the purge;
 * - prom-client's default process metrics (`process_*`, `nodejs_*`).
 */
@Injectable()
export class IdempotencyPrometheus implements OnModuleDestroy {
  readonly registry = new Registry();
  private readonly unsubscribe: () => void;

  constructor(metrics: IdempotencyMetrics) {
    collectDefaultMetrics({ register: this.registry });
    const registers = [this.registry];
    const requests = new Counter({
      name: 'idempotency_requests_total',
      help: 'Requests with an Idempotency-Key, by outcome.',
      labelNames: ['outcome'],
      registers,
    });
    // Every outcome is exported from the start, at 0, so rate() has a first sample.
    for (const outcome of REQUEST_OUTCOMES) requests.inc({ outcome }, 0);
    const others: Partial<Record<IdempotencyEvent, Counter>> = {
      released: new Counter({
        name: 'idempotency_keys_released_total',
        help: 'Keys given up after a result that is not stored (5xx, validation errors, …), so a retry runs again.',
        registers,
      }),
      expired: new Counter({
        name: 'idempotency_records_expired_total',
        help: 'Claims that took over an expired record or an abandoned lock.',
        registers,
      }),
      'lease-lost': new Counter({
        name: 'idempotency_leases_lost_total',
        help: 'Running handlers whose claim was found taken over: result not stored (transactional: rolled back).',
        registers,
      }),
      purged: new Counter({
        name: 'idempotency_records_purged_total',
        help: 'Expired records deleted by the purge.',
        registers,
      }),
    };
    this.unsubscribe = metrics.onEvent((event, count) => {
      if ((REQUEST_OUTCOMES as readonly string[]).includes(event)) {
        requests.inc({ outcome: event }, count);
      } else {
        others[event]?.inc(count);
      }
    });
  }

  onModuleDestroy(): void {
    this.unsubscribe();
  }
}
