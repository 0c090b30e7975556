import { Inject, Injectable, Logger } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  IdempotencyStore,
  type Lease,
  type RecordId,
  type RecordWatch,
  type StoredResponse,
} from './storage/idempotency-store.interface.js';
import { truncateKeyForLog } from './utils/idempotency-key.js';
import type { ConcurrencyMode } from './interfaces/idempotency-options.interface.js';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from './idempotency.options.js';
import { IdempotencyMetrics, type IdempotencyEvent } from './idempotency-metrics.js';

/** What to do with a request, decided by its key's record. */
export type Decision =
  /** The key is ours: run the handler, then `complete` or `release` the lease. */
  | { readonly action: 'execute'; readonly lease: Lease }
  /** The key completed with this payload: send the stored response. */
  | { readonly action: 'replay'; readonly response: StoredResponse }
  /** The key belongs to another payload. */
  | { readonly action: 'mismatch' }
  /** The first request with the key is still running (and the wait, if any, ran out). */
  | { readonly action: 'in-progress'; readonly retryAfterMs: number };

export interface BeginRequest {
  readonly id: RecordId;
  readonly fingerprint: string;
  readonly lockTimeoutMs: number;
  readonly concurrency: ConcurrencyMode;
  readonly waitTimeoutMs: number;
}

const OUTCOME_EVENTS: Record<Decision['action'], IdempotencyEvent> = {
  execute: 'executed',
  replay: 'replayed',
  mismatch: 'mismatch',
  'in-progress': 'conflict',
};

/**
 * While the store pushes changes (`RecordWatch.live`), a waiter still re-reads the record at least
 * this far apart (or every `waitPollInterval`, if that is longer): a safety net for a wake-up that
 * never comes — a notification lost in a reconnect, a completion by a process that does not notify.
 */
const NOTIFIED_WAIT_RECHECK_MS = 1_000;

/** How often, and how far apart, a failed write of a result is tried again. */
const WRITE_RETRY_DELAYS_MS = [0, 50, 250, 1000];

/**
 * The life of a key. Every transition is one conditional statement in the store, so concurrent
 * requests — in one process or many — agree on who owns a key.
 *
 * ```
 *                claim (insert wins)                  complete (lease held)
 *   (no record) ─────────────────────▶ IN_PROGRESS ─────────────────────────▶ COMPLETED
 *        ▲                               │   │  ▲                                  │
 *        │ release (lease held):         │   │  │ takeover: lock expired,          │ TTL over:
 *        │ 5xx, thrown error, 4xx the    │   │  │ same fingerprint (new lease)     │ the next claim
 *        │ client must correct           │   └──┘                                  │ takes it over,
 *        └───────────────────────────────┘                                         │ purge deletes it
 *                                                                                  ▼
 *   claim finds IN_PROGRESS (lock live) → 409, or wait;  COMPLETED (TTL live) → replay;
 *   any live record with another fingerprint → 422.
 * ```
 */
@Injectable()
export class IdempotencyService {
  private readonly logger = new Logger('Idempotency');

  constructor(
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
    @Inject(RESOLVED_OPTIONS) private readonly options: ResolvedModuleOptions,
    private readonly metrics: IdempotencyMetrics,
  ) {}

  /**
   * Claims the key or reads its record, and decides. In `'wait'` mode a request that finds the key
   * in progress waits until the first finishes (replay), gives up the key (this request claims it
   * and runs), or the wait runs out (in-progress). It is woken by the store when the store can
   * watch the record (PostgreSQL), and otherwise re-reads it every `waitPollInterval`. Errors of
   * the store propagate: without a decision the handler must not run.
   */
  async begin(request: BeginRequest): Promise<Decision> {
    const waitUntil = Date.now() + request.waitTimeoutMs;
    let watching = false;
    let watch: RecordWatch | undefined;
    try {
      for (;;) {
        const decision = await this.decide(request);
        const remainingMs = waitUntil - Date.now();
        if (decision.action !== 'in-progress' || request.concurrency !== 'wait' || remainingMs <= 0) {
          this.metrics.record(OUTCOME_EVENTS[decision.action]);
          return decision;
        }
        if (!watching) {
          watching = true;
          this.logger.debug(
            `Key ${describe({ id: request.id })} is in progress; waiting up to ${remainingMs} ms`,
          );
          watch = this.store.watch?.(request.id);
          // Watching began after the read: read again, or a change in between would go unseen.
          // (Not live yet: the watch wakes this request once it is, and the re-read happens then.)
          if (watch?.live) continue;
        }
        const intervalMs = watch?.live
          ? Math.max(this.options.waitPollIntervalMs, NOTIFIED_WAIT_RECHECK_MS)
          : this.options.waitPollIntervalMs;
        const delayMs = Math.min(intervalMs, remainingMs, decision.retryAfterMs);
        await (watch ? watch.changed(delayMs) : sleep(delayMs));
      }
    } finally {
      watch?.close();
    }
  }

  /**
   * Stores the handler's response under the lease. A failed write is retried; if it still fails
   * the record stays in progress until its lock times out, and the next retry after that runs the
   * handler again — logged as an error, since that is the one window in which a handler can run
   * twice. Never throws: the handler's response goes back to the client either way.
   */
  async complete(lease: Lease, response: StoredResponse, ttlMs: number): Promise<void> {
    await this.writeWithRetry(lease, 'store the response of', async () => {
      const stored = await this.withinStoreTimeout(
        this.store.complete(lease, response, Date.now() + ttlMs),
      );
      if (!stored) this.warnLostLease(lease, 'its response was not stored');
    });
  }

  /** Gives the key up so a retry runs the handler again. Never throws (see `complete`). */
  async release(lease: Lease): Promise<void> {
    await this.writeWithRetry(lease, 'release', async () => {
      const released = await this.withinStoreTimeout(this.store.release(lease));
      if (released) this.metrics.record('released');
      else this.warnLostLease(lease, 'it was not released');
    });
  }

  private async decide(request: BeginRequest): Promise<Decision> {
    const now = Date.now();
    const claim = await this.withinStoreTimeout(this.store.claim({
      id: request.id,
      fingerprint: request.fingerprint,
      token: randomUUID(),
      now,
      lockedUntil: now + request.lockTimeoutMs,
    }));
    if (claim.claimed) {
      if (claim.takeover) this.metrics.record('expired');
      // In wait mode duplicates may wait on this key: its completion or release must wake them.
      const lease = request.concurrency === 'wait' ? { ...claim.lease, watched: true } : claim.lease;
      return { action: 'execute', lease };
    }
    const { record } = claim;
    // The payload is checked first: another payload is a 422 whether the key is done or running.
    if (record.fingerprint !== request.fingerprint) return { action: 'mismatch' };
    if (record.state === 'completed' && record.response) {
      return { action: 'replay', response: record.response };
    }
    return { action: 'in-progress', retryAfterMs: Math.max(record.expiresAt - now, 0) };
  }

  private async writeWithRetry(lease: Lease, what: string, write: () => Promise<void>) {
    for (const [attempt, delayMs] of WRITE_RETRY_DELAYS_MS.entries()) {
      if (delayMs > 0) await sleep(delayMs);
      try {
        return await write();
      } catch (error) {
        if (attempt === WRITE_RETRY_DELAYS_MS.length - 1) {
          this.logger.error(
            `Could not ${what} key ${describe(lease)} after ${attempt + 1} attempts; it stays locked until its lock timeout, after which a retry runs the handler again: ${(error as Error).message}`,
          );
        }
      }
    }
  }

  /** Rejects once `storeTimeout` has passed; the operation itself may still finish later. */
  private withinStoreTimeout<T>(operation: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`store did not answer within ${this.options.storeTimeoutMs} ms`)),
        this.options.storeTimeoutMs,
      );
    });
    return Promise.race([operation, timeout]).finally(() => clearTimeout(timer));
  }

  private warnLostLease(lease: Lease, consequence: string) {
    this.logger.warn(
      `Key ${describe(lease)} was taken over by another request after its lock timed out; ${consequence}. Raise lockTimeout above the handler's longest run.`,
    );
  }
}

function describe({ id }: Pick<Lease, 'id'>): string {
  return `${truncateKeyForLog(id.key)} on ${id.endpoint}`;
}
