import { HttpException, Inject, Injectable, type OnApplicationShutdown } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  IdempotencyStore,
  type ClaimRequest,
  type ClaimResult,
  type Lease,
  type LeaseState,
  type RecordId,
  type RecordSnapshot,
  type RecordWatch,
  type StoredResponse,
  type StoreTransaction,
} from './storage/idempotency-store.interface.js';
import { truncateKeyForLog } from './utils/idempotency-key.js';
import type { ConcurrencyMode } from './interfaces/idempotency-options.interface.js';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from './idempotency.options.js';
import { IdempotencyMetrics, type IdempotencyEvent } from './idempotency-metrics.js';
import { runAsOperation } from './idempotency.context.js';
import { IdempotencyTracing, type TracedStep } from './observability/idempotency-tracing.js';
import { openUnencrypted, UnreadableResponseError } from './security/response-sealer.js';
import type { EntityManager } from 'typeorm';
import { isConnectionFailure, isDatabaseConnectionFailure } from './storage/connection-failure.js';
import { timerDelay } from './utils/duration.js';
import { quietLogger } from './utils/quiet-logger.js';

/** What to do with a request, decided by its key's record. */
export type Decision =
  /** The key is ours: run the handler, then `complete` or `release` the lease. */
  | { readonly action: 'execute'; readonly lease: Lease }
  /** The key completed with this payload: send the stored response. */
  | { readonly action: 'replay'; readonly response: StoredResponse }
  /** The key belongs to another payload. */
  | { readonly action: 'mismatch' }
  /** The first request with the key is still running (and the wait, if any, ran out). */
  | { readonly action: 'in-progress'; readonly retryAfterMs: number }
  /**
   * The key completed with this payload, but its stored response cannot be opened (encryption
   * keys, tampering): the request fails closed, and the handler does not run again.
   */
  | { readonly action: 'unreadable' };

export interface BeginRequest {
  readonly id: RecordId;
  readonly fingerprint: string;
  readonly lockTimeoutMs: number;
  readonly concurrency: ConcurrencyMode;
  readonly waitTimeoutMs: number;
}

/** How a handler ended: the value it returned, or what it threw. */
export type Outcome =
  { readonly ok: true; readonly value: unknown } | { readonly ok: false; readonly error: unknown };

/**
 * The transport's part of settling a key: the response to store for an outcome, or `null` when the
 * outcome is not stored and the key must be released (a crash, a status the policy does not keep,
 * a response too large or a stream). Must not throw.
 */
export type CaptureOutcome = (
  outcome: Outcome,
) => StoredResponse | null | Promise<StoredResponse | null>;

/** What `execute` needs of the route's options. */
export interface ExecuteOptions {
  readonly ttlMs: number;
  readonly lockTimeoutMs: number;
  readonly lockRenewalLimitMs: number;
  readonly transactional: boolean;
}

/**
 * The lease of a transactional route was lost before its completion (taken over after its lock
 * timed out): the transaction was rolled back, nothing of this attempt was committed. Each
 * transport renders it (HTTP: 409 problem `lease-lost`).
 */
export class LeaseLostError extends Error {
  constructor(readonly lease: Lease) {
    super('the claim on this key was taken over by another request; this attempt was rolled back');
  }
}

/**
 * A transactional route produced a result that is not stored (a status the policy does not keep,
 * a response over maxResponseBytes, a stream): its writes were rolled back and its key released,
 * since committing them without a stored response would let a retry run them again.
 */
export class UnstoredResultError extends Error {
  constructor(readonly lease: Lease) {
    super('the result of a transactional route could not be stored; its writes were rolled back');
  }
}

/**
 * The database connection of a transactional route failed while it ran (the handler's statements,
 * the completion or the COMMIT): nothing of the attempt committed — or, if only the COMMIT's answer
 * was lost, the retry finds the stored response. Each transport renders it as the store being
 * unavailable (HTTP: 503 problem `store-unavailable`, with Retry-After).
 */
export class TransactionUnavailableError extends Error {
  constructor(
    readonly lease: Lease,
    override readonly cause: unknown,
  ) {
    super('the database connection of this transactional route failed; nothing was committed');
  }
}

const OUTCOME_EVENTS: Record<Decision['action'], IdempotencyEvent> = {
  execute: 'executed',
  replay: 'replayed',
  mismatch: 'mismatch',
  'in-progress': 'conflict',
  unreadable: 'unreadable',
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
 * Renewals of one lease sent and neither answered nor given up on yet (each is given up on after
 * `min(storeTimeout, lockTimeout / 3)`), beyond which a beat sends none: a store that answers
 * nothing is not sent ever more statements.
 */
const MAX_PENDING_RENEWALS = 2;

/** The store did not answer within `storeTimeout` (the operation itself may still finish later). */
class StoreTimeoutError extends Error {}

/**
 * The life of a key. Every transition is one conditional statement in the store, so concurrent
 * requests — in one process or many — agree on who owns a key.
 *
 * ```
 *                claim (insert wins)                  complete (lease held)
 *   (no record) ─────────────────────▶ IN_PROGRESS ─────────────────────────▶ COMPLETED
 *        ▲                             │  │   │  ▲                                  │
 *        │ release (lease held):       │  │   │  │ takeover: lock expired,          │ TTL over:
 *        │ 5xx, thrown error, 4xx the  │  │   │  │ same fingerprint (new lease)     │ the next claim
 *        │ client must correct         │  │   └──┘                                  │ takes it over,
 *        └─────────────────────────────┘  │ renew (lease held): every lockTimeout/3 │ purge deletes it
 *                                         └──▶ while the handler runs             ▼
 *   claim finds IN_PROGRESS (lock live) → 409, or wait;  COMPLETED (TTL live) → replay;
 *   any live record with another fingerprint → 422.
 * ```
 *
 * Transactional mode: the claim commits on its own; the handler's writes and `complete` share one
 * transaction, so the record reaches COMPLETED exactly when the writes commit. A lost lease makes
 * `complete` match nothing, and the transaction rolls back.
 */
@Injectable()
export class IdempotencyService implements OnApplicationShutdown {
  private readonly logger = quietLogger('Idempotency');
  /** Renewals of the handlers running in this process. */
  private readonly renewals = new Set<LeaseRenewal>();

  constructor(
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
    @Inject(RESOLVED_OPTIONS) private readonly options: ResolvedModuleOptions,
    private readonly metrics: IdempotencyMetrics,
    private readonly tracing: IdempotencyTracing,
  ) {}

  /**
   * Claims the key or reads its record, and decides. In `'wait'` mode a request that finds the key
   * in progress waits until the first finishes (replay), gives up the key (this request claims it
   * and runs), or the wait runs out (in-progress). It is woken by the store when the store can
   * watch the record (PostgreSQL), and otherwise re-reads it every `waitPollInterval`. Errors of
   * the store propagate: without a decision the handler must not run.
   */
  begin(request: BeginRequest): Promise<Decision> {
    return this.tracing.step('claim', request.id, async (traced) => {
      try {
        const decision = await this.decideWaiting(request);
        traced.outcome(OUTCOME_EVENTS[decision.action]);
        return decision;
      } catch (error) {
        traced.outcome('store-unavailable');
        throw error;
      }
    });
  }

  private async decideWaiting(request: BeginRequest): Promise<Decision> {
    const waitUntil = Date.now() + request.waitTimeoutMs;
    let watching = false;
    let watch: RecordWatch | undefined;
    try {
      for (;;) {
        const decision = await this.decide(request);
        const remainingMs = waitUntil - Date.now();
        if (
          decision.action !== 'in-progress' ||
          request.concurrency !== 'wait' ||
          remainingMs <= 0
        ) {
          this.metrics.record(OUTCOME_EVENTS[decision.action], 1, request.id);
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
        const delayMs = timerDelay(Math.min(intervalMs, remainingMs, decision.retryAfterMs));
        await (watch ? watch.changed(delayMs) : sleep(delayMs));
      }
    } finally {
      watch?.close();
    }
  }

  /**
   * Runs the handler of a claimed key (`run`, given the transaction's EntityManager in
   * transactional mode) as the key's operation (see `IdempotencyContext`), then stores what
   * `capture` makes of its outcome or releases the key. The claim is renewed until its result is
   * stored or the key released (retries included), so no duplicate takes the key over while a slow
   * store is still writing the result. Resolves to the handler's value or rejects with its error,
   * as the handler did; in transactional mode it may also reject with `LeaseLostError`,
   * `UnstoredResultError` or `TransactionUnavailableError` (nothing was committed).
   */
  async execute(
    lease: Lease,
    fingerprint: string,
    route: ExecuteOptions,
    run: () => Promise<unknown>,
    capture: CaptureOutcome,
  ): Promise<unknown> {
    const renewal = this.renew(lease, route);
    const operation = (entityManager?: EntityManager) =>
      this.tracing.step(
        'run',
        lease.id,
        async (traced) => {
          const outcome = await settled(
            runAsOperation({ ...lease.id, fingerprint, entityManager }, run),
          );
          traced.outcome(outcome.ok ? 'returned' : 'threw');
          if (!outcome.ok) throw outcome.error;
          return outcome.value;
        },
        true,
      );
    try {
      if (route.transactional)
        return await this.executeInTransaction(lease, route, renewal, operation, capture);
      const outcome = await settled(operation());
      renewal.settling = true;
      // Renewed until the result is stored, its capture included (GraphQL awaits lazy fields).
      await this.settle(lease, await capture(outcome), route.ttlMs, renewal);
      if (!outcome.ok) throw outcome.error;
      return outcome.value;
    } finally {
      renewal.stop();
    }
  }

  /**
   * The claim is committed already; the handler's writes and the completion share one transaction,
   * the completion (conditional on the lease) as its last statement. A handler that throws rolls
   * its writes back, then its outcome is stored or released as in the plain mode. The claim is
   * renewed until the completion has run in the transaction (from then on the transaction holds the
   * record's row: a claim waits for it to end), and through the storing or release that follows a
   * rollback.
   */
  private async executeInTransaction(
    lease: Lease,
    route: ExecuteOptions,
    renewal: LeaseRenewal,
    operation: (entityManager: EntityManager) => Promise<unknown>,
    capture: CaptureOutcome,
  ): Promise<unknown> {
    if (!this.store.transaction)
      throw new Error('nestjs-idempotency: this store has no transactional mode');
    /** The handler threw (its writes are rolled back): what it threw. */
    let failed: { readonly ok: false; readonly error: unknown } | undefined;
    /** What the handler threw came from the transaction's own connection failing. */
    let connectionLost = false;
    try {
      return await this.store.transaction(async (transaction) => {
        const outcome = await settled(operation(transaction.manager));
        renewal.settling = true;
        if (!outcome.ok) {
          failed = { ok: false, error: outcome.error };
          connectionLost = await this.lostItsConnection(transaction, outcome.error);
          throw outcome.error;
        }
        const response = await capture(outcome);
        if (!response) throw new UnstoredResultError(lease);
        await this.tracing.step('complete', lease.id, async (traced) => {
          const stored = await transaction.complete(
            lease,
            this.sealed(lease, response),
            Date.now() + route.ttlMs,
          );
          // The transaction holds the row now: a renewal would only wait for it to end.
          renewal.stop();
          traced.outcome(stored ? 'stored' : 'lease-lost');
          if (!stored) throw new LeaseLostError(lease);
        });
        return outcome.value;
      });
    } catch (error) {
      const handlerError = failed;
      // The transaction's own statements (BEGIN, the completion, COMMIT) are the store's; what the
      // handler threw is its own answer unless its transaction's connection was found dead.
      const connectionFailure = handlerError ? connectionLost : isConnectionFailure(error);
      if (connectionFailure) {
        const cause = handlerError ? handlerError.error : error;
        this.logger.warn(
          `The database connection of transactional key ${describe(lease)} failed while it ran (${(cause as Error).message}); nothing was committed, answered as the store being unavailable.`,
        );
        // If only the COMMIT's answer was lost, the record is completed: the release finds it so.
        await this.releaseKey(lease, renewal, undefined, true);
        throw new TransactionUnavailableError(lease, cause);
      }
      if (handlerError) {
        await this.settle(lease, await capture(handlerError), route.ttlMs, renewal);
        throw handlerError.error;
      }
      if (error instanceof LeaseLostError) {
        this.reportLostLease(
          lease,
          renewal,
          'its transaction was rolled back and nothing of this attempt was committed',
        );
        throw error;
      }
      // Not stored, or the transaction itself failed (BEGIN, the completion, COMMIT): whether or not
      // it committed, the release is right — it deletes only a record still in progress, which a
      // committed completion is not.
      await this.releaseKey(lease, renewal, undefined, !(error instanceof UnstoredResultError));
      throw error;
    }
  }

  /**
   * Whether a transactional handler's error comes from its transaction's connection having failed,
   * rather than being the handler's own: an HttpException is the handler's answer whatever caused
   * it (a payment gateway that refused the connection, say); any other error that looks like a
   * network failure counts as the transaction's only if its connection no longer answers (any
   * answer counts, PostgreSQL's refusal of statements in a failed transaction included).
   */
  private async lostItsConnection(transaction: StoreTransaction, error: unknown): Promise<boolean> {
    if (error instanceof HttpException || !isConnectionFailure(error)) return false;
    if (isDatabaseConnectionFailure(error)) return true;
    try {
      await this.withinStoreTimeout(transaction.manager.query('SELECT 1'));
      return false;
    } catch (probe) {
      return probe instanceof StoreTimeoutError || isConnectionFailure(probe);
    }
  }

  /**
   * Stops every renewal once the app has closed: a process going down must not keep its keys
   * locked. Not before: Nest closes the HTTP server after `beforeApplicationShutdown` and waits
   * for the requests in flight, whose handlers still run and store their results; a lock left to
   * run out meanwhile would let another instance run the same handler a second time.
   */
  onApplicationShutdown(): void {
    for (const renewal of this.renewals) renewal.stop();
  }

  private settle(
    lease: Lease,
    response: StoredResponse | null,
    ttlMs: number,
    renewal: LeaseRenewal,
  ) {
    return this.tracing.step('complete', lease.id, (traced) =>
      response
        ? this.complete(lease, response, ttlMs, renewal, traced)
        : this.release(lease, renewal, traced),
    );
  }

  /**
   * Renews the lease every `lockTimeout / 3` until `stop()` (its result stored or its key released),
   * the renewal limit, the app's close (once Nest has drained the requests in flight), or a renewal
   * that finds the lease gone. A renewal the store does not answer within
   * `min(storeTimeout, lockTimeout / 3)` does not hold the next one back (at most two are left
   * waiting). A lease the store could not renew for `lockTimeout` may have been
   * taken over: that is logged, renewal goes on (one that lands while nobody took the key over
   * holds it again), and the completion, conditional on the lease, finds out.
   */
  private renew(lease: Lease, route: ExecuteOptions): LeaseRenewal {
    const renewal: LeaseRenewal = {
      stopped: false,
      settling: false,
      lostReported: false,
      stop: () => undefined,
    };
    if (route.lockRenewalLimitMs <= 0 || route.lockTimeoutMs <= 0) {
      renewal.stopped = true;
      return renewal;
    }
    const intervalMs = timerDelay(Math.max(1, Math.floor(route.lockTimeoutMs / 3)));
    const patienceMs = Math.min(this.options.storeTimeoutMs, intervalMs);
    // How long the handler ran is measured on the monotonic clock: a step of the wall clock (NTP,
    // a VM resumed) is no time spent. Locks are wall-clock times, as every process reads them.
    const startedAt = performance.now();
    /** When the last renewal the store confirmed was sent (the claim, at first). */
    let renewedAt = startedAt;
    let pending = 0;
    let lapseReported = false;
    const beat = () => {
      const now = Date.now();
      const elapsed = performance.now();
      // The limit is for a hung handler; one whose result is being stored is not hung.
      if (!renewal.settling && elapsed - startedAt >= route.lockRenewalLimitMs) {
        renewal.stop();
        this.logger.error(
          `Key ${describe(lease)} has run for lockRenewalLimit (${route.lockRenewalLimitMs} ms) and is presumed hung: its claim is no longer renewed, and a retry can take it over ${route.lockTimeoutMs} ms after the last renewal.`,
        );
        return;
      }
      if (!lapseReported && elapsed - renewedAt >= route.lockTimeoutMs) {
        lapseReported = true;
        this.logger.error(
          `The claim on key ${describe(lease)} could not be renewed for lockTimeout (${route.lockTimeoutMs} ms): the store did not answer. A retry may take the key over and run the handler again; this request's result is stored only if its claim is still held. Still trying to renew it.`,
        );
      }
      if (pending >= MAX_PENDING_RENEWALS) return;
      pending++;
      let waiting = true;
      const done = () => {
        if (waiting) pending--;
        waiting = false;
      };
      const giveUp = setTimeout(done, patienceMs);
      const renewing = Promise.resolve().then(() =>
        this.store.renew(lease, now + route.lockTimeoutMs),
      );
      this.withinStoreTimeout(renewing).then(
        (renewed) => {
          clearTimeout(giveUp);
          done();
          if (renewal.stopped) return;
          if (renewed) {
            renewedAt = Math.max(renewedAt, elapsed);
            lapseReported = false;
            return;
          }
          // Its own completion or release may have ended the lease: the result of that tells.
          if (renewal.settling) return;
          renewal.stop();
          this.reportLostLease(lease, renewal, 'its result will not be stored');
        },
        (error: unknown) => {
          clearTimeout(giveUp);
          done();
          if (!renewal.stopped) {
            this.logger.warn(
              `Could not renew the claim on key ${describe(lease)}; trying again at the next beat: ${(error as Error).message}`,
            );
          }
        },
      );
    };
    const timer = setInterval(beat, intervalMs);
    timer.unref();
    renewal.stop = () => {
      renewal.stopped = true;
      clearInterval(timer);
      this.renewals.delete(renewal);
    };
    this.renewals.add(renewal);
    return renewal;
  }

  /**
   * Stores the handler's response under the lease (plain mode). A failed write is retried; if it
   * still fails the record stays in progress until its lock times out, and the next retry after
   * that runs the handler again — logged as an error (the transactional mode has no such case: its
   * completion commits with the handler's writes). A retry that finds the response stored already
   * (an earlier attempt whose answer was lost) counts as done. Never throws: the handler's response
   * goes back to the client either way.
   */
  async complete(
    lease: Lease,
    response: StoredResponse,
    ttlMs: number,
    renewal?: LeaseRenewal,
    traced?: TracedStep,
  ): Promise<void> {
    const sealed = this.sealed(lease, response);
    traced?.outcome('failed');
    await this.writeWithRetry(lease, 'store the response of', false, async (uncertain) => {
      const stored =
        (await this.withinStoreTimeout(this.store.complete(lease, sealed, Date.now() + ttlMs))) ||
        (uncertain && (await this.leaseStateOf(lease)) === 'completed');
      traced?.outcome(stored ? 'stored' : 'lease-lost');
      if (!stored) this.reportLostLease(lease, renewal, 'its response was not stored');
    });
  }

  /** Gives the key up so a retry runs the handler again. Never throws (see `complete`). */
  release(lease: Lease, renewal?: LeaseRenewal, traced?: TracedStep): Promise<void> {
    return this.releaseKey(lease, renewal, traced, false);
  }

  /**
   * `release`; `uncertain`: an earlier write may have ended the lease already (a COMMIT whose answer
   * was lost), so finding the record gone or completed under this lease is not a lost lease.
   */
  private async releaseKey(
    lease: Lease,
    renewal: LeaseRenewal | undefined,
    traced: TracedStep | undefined,
    uncertain: boolean,
  ): Promise<void> {
    traced?.outcome('failed');
    await this.writeWithRetry(lease, 'release', uncertain, async (retried) => {
      const released = await this.withinStoreTimeout(this.store.release(lease));
      const state = released || !retried ? undefined : await this.leaseStateOf(lease);
      traced?.outcome(released || state === 'absent' ? 'released' : 'lease-lost');
      if (released || state === 'absent') this.metrics.record('released', 1, lease.id);
      else if (state === 'completed')
        this.logger.warn(
          `Key ${describe(lease)} was completed by a transaction whose COMMIT's answer was lost; its response is stored, and a retry replays it.`,
        );
      else this.reportLostLease(lease, renewal, 'it was not released');
    });
  }

  /**
   * Where the lease stands, when the store can tell (`IdempotencyStore.leaseState`); `undefined`
   * otherwise.
   */
  private async leaseStateOf(lease: Lease): Promise<LeaseState | undefined> {
    return this.store.leaseState
      ? await this.withinStoreTimeout(this.store.leaseState(lease))
      : undefined;
  }

  /** The response as the store keeps it: sealed when encryption is on. */
  private sealed(lease: Lease, response: StoredResponse): StoredResponse {
    if (!this.options.sealer) return response;
    if (lease.fingerprint === undefined)
      throw new TypeError(
        'nestjs-idempotency: a lease to seal a response under has no fingerprint',
      );
    const { id, fingerprint, token } = lease;
    return this.options.sealer.seal({ id, fingerprint, token }, response);
  }

  /**
   * A stored response opened for replay, or `undefined` (logged, without the body) when it cannot
   * be: sealed under keys that are not configured, tampered with, copied from another record, or
   * sealed while encryption is off (and unsealed while it is on, unless `acceptUnsealed`).
   */
  private opened(
    id: RecordId,
    record: RecordSnapshot,
    stored: StoredResponse,
  ): StoredResponse | undefined {
    try {
      return this.options.sealer
        ? this.options.sealer.open(
            { id, fingerprint: record.fingerprint, token: record.token },
            stored,
          )
        : openUnencrypted(stored);
    } catch (error) {
      if (!(error instanceof UnreadableResponseError)) throw error;
      this.logger.error(
        `The stored response of key ${describe({ id })} cannot be replayed: ${error.message}. Answered with a 500 problem; the handler was not run again.`,
      );
      return undefined;
    }
  }

  private async decide(request: BeginRequest): Promise<Decision> {
    const now = Date.now();
    const cached = this.options.replayCache?.get(request.id, now);
    if (cached)
      return cached.fingerprint === request.fingerprint
        ? { action: 'replay', response: cached.response }
        : { action: 'mismatch' };
    // In wait mode duplicates may wait on this key: its completion or release must wake them.
    const watched = request.concurrency === 'wait';
    const claimRequest: ClaimRequest = {
      id: request.id,
      fingerprint: request.fingerprint,
      token: randomUUID(),
      now,
      lockedUntil: now + request.lockTimeoutMs,
    };
    let claim: ClaimResult;
    try {
      claim = await this.claimWithin(claimRequest, watched);
    } catch (error) {
      // Its connection died, maybe after the claim committed: once more, with the same token (a
      // claim that finds its own token counts as claimed), or the key stays locked for lockTimeout.
      if (!isConnectionFailure(error)) throw error;
      claim = await this.claimWithin(claimRequest, watched);
    }
    if (claim.claimed) {
      if (claim.takeover) this.metrics.record('expired', 1, request.id);
      // In wait mode duplicates may wait on this key: its completion or release must wake them.
      // The fingerprint goes with the lease: an encrypted response is bound to it.
      const lease: Lease = {
        ...claim.lease,
        fingerprint: request.fingerprint,
        ...(watched && { watched: true }),
      };
      return { action: 'execute', lease };
    }
    const { record } = claim;
    // The payload is checked first: another payload is a 422 whether the key is done or running.
    if (record.fingerprint !== request.fingerprint) return { action: 'mismatch' };
    if (record.state === 'completed' && record.response) {
      const response = this.opened(request.id, record, record.response);
      if (!response) return { action: 'unreadable' };
      this.options.replayCache?.set(request.id, {
        fingerprint: record.fingerprint,
        expiresAt: record.expiresAt,
        response,
      });
      return { action: 'replay', response };
    }
    return { action: 'in-progress', retryAfterMs: Math.max(record.expiresAt - now, 0) };
  }

  /**
   * The claim, within `storeTimeout`. A claim the store answers later, once its request was refused
   * (503), is released as soon as it lands: nobody runs it, and it would lock the key against the
   * client's retry for lockTimeout.
   */
  private async claimWithin(request: ClaimRequest, watched: boolean): Promise<ClaimResult> {
    const claiming = this.store.claim(request);
    try {
      return await this.withinStoreTimeout(claiming);
    } catch (error) {
      if (error instanceof StoreTimeoutError) {
        claiming.then(
          (late) => {
            if (!late.claimed) return;
            const lease = watched ? { ...late.lease, watched: true } : late.lease;
            this.store.release(lease).then(
              () =>
                this.logger.debug(
                  `The claim on key ${describe(lease)} landed after its request was refused (the store did not answer within storeTimeout); released.`,
                ),
              () => undefined,
            );
          },
          () => undefined,
        );
      }
      throw error;
    }
  }

  /**
   * Runs `write` until it does not throw, at most once per `WRITE_RETRY_DELAYS_MS`. `write` is told
   * whether an earlier write may have applied already without its answer reaching us: `uncertain`
   * at first, and on every retry (the attempt before threw: a timeout, a lost connection).
   */
  private async writeWithRetry(
    lease: Lease,
    what: string,
    uncertain: boolean,
    write: (uncertain: boolean) => Promise<void>,
  ) {
    for (const [attempt, delayMs] of WRITE_RETRY_DELAYS_MS.entries()) {
      if (delayMs > 0) await sleep(delayMs);
      try {
        return await write(uncertain || attempt > 0);
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
        () =>
          reject(
            new StoreTimeoutError(`store did not answer within ${this.options.storeTimeoutMs} ms`),
          ),
        timerDelay(this.options.storeTimeoutMs),
      );
    });
    return Promise.race([operation, timeout]).finally(() => clearTimeout(timer));
  }

  /** Logs and counts a lost lease, once per execution (its renewal may have found it first). */
  private reportLostLease(lease: Lease, renewal: LeaseRenewal | undefined, consequence: string) {
    if (renewal?.lostReported) return;
    if (renewal) renewal.lostReported = true;
    this.metrics.record('lease-lost', 1, lease.id);
    this.logger.warn(
      `Key ${describe(lease)} was taken over by another request after its claim went unrenewed for lockTimeout; ${consequence}.`,
    );
  }
}

/** The renewal of one running handler's lease. */
interface LeaseRenewal {
  stopped: boolean;
  /**
   * The handler has settled and its result is being stored (or its key released): a renewal that
   * finds the lease gone may have been overtaken by that very write, so it is not a lost lease.
   */
  settling: boolean;
  /** The loss of this lease was logged and counted already. */
  lostReported: boolean;
  stop(): void;
}

/** The outcome of a handler's promise, never rejecting. */
function settled(promise: Promise<unknown>): Promise<Outcome> {
  return promise.then(
    (value) => ({ ok: true, value }),
    (error: unknown) => ({ ok: false, error }),
  );
}

function describe({ id }: Pick<Lease, 'id'>): string {
  return `${truncateKeyForLog(id.key)} on ${id.endpoint}`;
}
