import { KeyEvents, type KeyEvent, type KeyEventListener } from '../core/key-events.js';
import type { IdempotencyEvent, IdempotencyMetrics } from '../idempotency-metrics.js';
import type { IdempotencyTracing } from './idempotency-tracing.js';
import { logKeyEvents } from './key-event-log.js';

/** The counter of each decision. */
const DECISION_COUNTERS: Record<
  Extract<KeyEvent, { type: 'decided' }>['action'],
  IdempotencyEvent
> = {
  execute: 'executed',
  replay: 'replayed',
  mismatch: 'mismatch',
  'in-progress': 'conflict',
  unreadable: 'unreadable',
};

/** The metrics of the key's events: a counter per decision, takeover, release and lost lease. */
export function countKeyEvents(metrics: IdempotencyMetrics): KeyEventListener {
  return (event: KeyEvent) => {
    switch (event.type) {
      case 'decided':
        metrics.record(DECISION_COUNTERS[event.action], 1, event.id);
        return;
      case 'taken-over':
        metrics.record('expired', 1, event.id);
        return;
      case 'released':
        metrics.record('released', 1, event.id);
        return;
      case 'lease-lost':
        metrics.record('lease-lost', 1, event.id);
        return;
      default:
        return;
    }
  };
}

/**
 * The module's stream of key events, with its observers: the metrics (counters, listeners and
 * diagnostics channels), the logs, and the spans when a tracer is active.
 */
export function observedKeyEvents(
  metrics: IdempotencyMetrics,
  tracing: IdempotencyTracing,
): KeyEvents {
  const events = new KeyEvents();
  events.subscribe(countKeyEvents(metrics));
  events.subscribe(logKeyEvents());
  events.traceWith(tracing);
  return events;
}
