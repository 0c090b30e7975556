import { Injectable, Logger } from '@nestjs/common';
import { channel, type Channel } from 'node:diagnostics_channel';
import type { RecordId } from './storage/idempotency-store.interface.js';

/** What happened to a request or a record, as counted by {@link IdempotencyMetrics}. */
export type IdempotencyEvent =
  /** A request claimed its key and ran the handler. */
  | 'executed'
  /** A stored response was sent again. */
  | 'replayed'
  /** A duplicate found its key in progress (409). */
  | 'conflict'
  /** A key was reused with another payload (422). */
  | 'mismatch'
  /** A key was given up after a result that is not stored (5xx, validation errors, …). */
  | 'released'
  /** A claim took over an expired record (TTL over, or an abandoned in-progress lock). */
  | 'expired'
  /**
   * A running handler's claim was found taken over (by its renewal, or by its completion): its
   * result was not stored; in transactional mode its writes were rolled back.
   */
  | 'lease-lost'
  /** A stored response could not be opened (encryption keys, tampering): 500, the handler not run. */
  | 'unreadable'
  /** Records deleted by the purge. */
  | 'purged';

/**
 * The message published on the `node:diagnostics_channel` of an event (`nestjs-idempotency:` + the
 * event, e.g. `nestjs-idempotency:replayed`): the event, how many, and the record it concerns (all
 * but `purged`).
 */
export interface IdempotencyEventMessage {
  /** What happened. */
  readonly event: IdempotencyEvent;
  /** How many times (rows, for `purged`; 1 for the others). */
  readonly count: number;
  /** The record's scope, endpoint and key; absent for `purged`. */
  readonly id?: RecordId;
}

/** The diagnostics channel name of an event. */
export function idempotencyChannelName(event: IdempotencyEvent): string {
  return `nestjs-idempotency:${event}`;
}

/**
 * A listener of {@link IdempotencyMetrics.onEvent}: called with each event and how many times it
 * happened. A listener that throws is logged once and ignored; it never changes a request's outcome.
 */
export type IdempotencyEventListener = (event: IdempotencyEvent, count: number) => void;

const EVENTS: readonly IdempotencyEvent[] = [
  'executed',
  'replayed',
  'conflict',
  'mismatch',
  'released',
  'expired',
  'lease-lost',
  'unreadable',
  'purged',
];

const CHANNELS = Object.fromEntries(
  EVENTS.map((event) => [event, channel(idempotencyChannelName(event))]),
) as Record<IdempotencyEvent, Channel>;

/**
 * Counters since startup, for export to whatever metrics system the app uses: read `snapshot()`
 * on scrape, or subscribe with `onEvent` to forward each increment (e.g. to a prom-client Counter).
 * Each event is also published on its `node:diagnostics_channel` (see `idempotencyChannelName`), for
 * APMs and code outside Nest's container; nothing is built when no one subscribes.
 *
 * Observing never changes an outcome: a listener that throws is logged (once per listener) and the
 * request goes on. (A diagnostics_channel subscriber that throws is Node's to report: it re-throws
 * the error on the next tick, as for every channel, outside the request.)
 */
@Injectable()
export class IdempotencyMetrics {
  private readonly counts = Object.fromEntries(EVENTS.map((event) => [event, 0])) as Record<
    IdempotencyEvent,
    number
  >;
  private readonly listeners = new Set<IdempotencyEventListener>();
  /** Listeners whose failure was logged already. */
  private readonly failedListeners = new WeakSet<IdempotencyEventListener>();

  /** Counts `count` occurrences of `event` (about record `id`), tells the listeners and the channel. */
  record(event: IdempotencyEvent, count = 1, id?: RecordId): void {
    if (count <= 0) return;
    this.counts[event] += count;
    for (const listener of this.listeners) {
      try {
        listener(event, count);
      } catch (error) {
        this.listenerFailed(listener, event, error);
      }
    }
    const published = CHANNELS[event];
    if (published.hasSubscribers)
      published.publish({ event, count, id } satisfies IdempotencyEventMessage);
  }

  private listenerFailed(listener: IdempotencyEventListener, event: string, error: unknown) {
    if (this.failedListeners.has(listener)) return;
    this.failedListeners.add(listener);
    try {
      new Logger('Idempotency').error(
        `A metrics listener (onEvent) threw on '${event}': ${(error as Error)?.message ?? String(error)}. Ignored, here and from now on: the request's outcome does not depend on its metrics.`,
      );
    } catch {
      // The app's logger threw too: nothing left to tell it with.
    }
  }

  /** The counters as they stand. */
  snapshot(): Readonly<Record<IdempotencyEvent, number>> {
    return { ...this.counts };
  }

  /** Calls `listener` on every increment; returns the function that unsubscribes it. */
  onEvent(listener: IdempotencyEventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}
