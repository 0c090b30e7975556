import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { openUnencrypted, UnreadableResponseError } from '../security/response-sealer.js';
import { isConnectionFailure } from '../storage/connection-failure.js';
import type {
  ClaimRequest,
  ClaimResult,
  IdempotencyStore,
  Lease,
  RecordId,
  RecordSnapshot,
  RecordWatch,
  StoredResponse,
} from '../storage/idempotency-store.interface.js';
import { timerDelay } from '../utils/duration.js';
import { StoreTimeoutError, withinStoreTimeout } from './key-errors.js';
import type { KeyEvents } from './key-events.js';
import type { BeginRequest, CoreSettings, Decision } from './types.js';

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
 *
 * The same, as data (the docs' Mermaid diagram is drawn from it): `[from, transition, to]`.
 */
export const KEY_TRANSITIONS = [
  ['absent', 'claim', 'in_progress'],
  ['in_progress', 'renew', 'in_progress'],
  ['in_progress', 'complete', 'completed'],
  ['in_progress', 'release', 'absent'],
  ['in_progress', 'take over (lock expired, same fingerprint)', 'in_progress'],
  ['completed', 'take over (TTL over)', 'in_progress'],
  ['completed', 'purge (TTL over)', 'absent'],
] as const satisfies readonly (readonly [KeyState, string, KeyState])[];

/** Where a key stands: no record, a record in progress (locked by a lease), or completed. */
export type KeyState = 'absent' | 'in_progress' | 'completed';

/**
 * While the store pushes changes (`RecordWatch.live`), a waiter still re-reads the record at least
 * this far apart (or every `waitPollInterval`, if that is longer): a safety net for a wake-up that
 * never comes — a notification lost in a reconnect, a completion by a process that does not notify.
 */
export const NOTIFIED_WAIT_RECHECK_MS = 1_000;

/** How a claim that lost to a live record decides, given the record's stored response opened. */
export type OpenResponse = (
  record: RecordSnapshot,
  stored: StoredResponse,
) => StoredResponse | undefined;

/**
 * The decision for a claim's result (pure): the key is ours (`execute`), or the record that holds
 * it decides — another payload is a 422 whether the key is done or running (`mismatch`), a
 * completed record replays (or is `unreadable`), a running one is `in-progress`.
 */
export function decisionOf(
  claim: ClaimResult,
  fingerprint: string,
  now: number,
  open: OpenResponse,
  watched = false,
): Decision {
  if (claim.claimed) {
    // In wait mode duplicates may wait on this key: its completion or release must wake them.
    // The fingerprint goes with the lease: an encrypted response is bound to it.
    const lease: Lease = { ...claim.lease, fingerprint, ...(watched && { watched: true }) };
    return { action: 'execute', lease };
  }
  const { record } = claim;
  if (record.fingerprint !== fingerprint) return { action: 'mismatch' };
  if (record.state === 'completed' && record.response) {
    const response = open(record, record.response);
    return response ? { action: 'replay', response } : { action: 'unreadable' };
  }
  return { action: 'in-progress', retryAfterMs: Math.max(record.expiresAt - now, 0) };
}

/**
 * The claim of a key and the decision it leads to: the state machine's entry. It imports nothing
 * from transports, options parsing or observability: it tells what happened on `KeyEvents`.
 */
export class KeyStateMachine {
  constructor(
    private readonly store: Pick<IdempotencyStore, 'claim' | 'release' | 'watch'>,
    private readonly settings: CoreSettings,
    private readonly events: KeyEvents,
  ) {}

  /**
   * Claims the key or reads its record, and decides. In `'wait'` mode a request that finds the key
   * in progress waits until the first finishes (replay), gives up the key (this request claims it
   * and runs), or the wait runs out (in-progress). It is woken by the store when the store can
   * watch the record (PostgreSQL), and otherwise re-reads it every `waitPollInterval`. Errors of
   * the store propagate: without a decision the handler must not run.
   */
  begin(request: BeginRequest): Promise<Decision> {
    if (!this.events.tracing) {
      // A record this process read before: decided without a round trip (nor an await).
      const cached = this.fromCache(request, Date.now());
      return cached
        ? Promise.resolve(this.decided(request.id, cached))
        : this.decideWaiting(request, true);
    }
    return this.events.step('claim', request.id, async (traced) => {
      try {
        const decision = await this.decideWaiting(request);
        traced.outcome(TRACED_OUTCOMES[decision.action]);
        return decision;
      } catch (error) {
        traced.outcome('store-unavailable');
        throw error;
      }
    });
  }

  /** @param cacheChecked the replay cache was just asked (and had nothing): not asked again. */
  private async decideWaiting(request: BeginRequest, cacheChecked = false): Promise<Decision> {
    const waitUntil = Date.now() + request.waitTimeoutMs;
    const first = await this.decide(request, cacheChecked);
    // The path of nearly every request: decided at the first read.
    if (first.action !== 'in-progress' || request.concurrency !== 'wait')
      return this.decided(request.id, first);
    let decision: Decision = first;
    let watching = false;
    let watch: RecordWatch | undefined;
    try {
      for (;;) {
        const remainingMs = waitUntil - Date.now();
        if (decision.action !== 'in-progress' || remainingMs <= 0)
          return this.decided(request.id, decision);
        if (!watching) {
          watching = true;
          this.events.emit({ type: 'waiting', id: request.id, remainingMs });
          watch = this.store.watch?.(request.id);
          // Watching began after the read: read again, or a change in between would go unseen.
          // (Not live yet: the watch wakes this request once it is, and the re-read happens then.)
          if (watch?.live) {
            decision = await this.decide(request);
            continue;
          }
        }
        const intervalMs = watch?.live
          ? Math.max(this.settings.waitPollIntervalMs, NOTIFIED_WAIT_RECHECK_MS)
          : this.settings.waitPollIntervalMs;
        const delayMs = timerDelay(Math.min(intervalMs, remainingMs, decision.retryAfterMs));
        await (watch ? watch.changed(delayMs) : sleep(delayMs));
        decision = await this.decide(request);
      }
    } finally {
      watch?.close();
    }
  }

  private decided(id: RecordId, decision: Decision): Decision {
    this.events.emit({ type: 'decided', id, action: decision.action });
    return decision;
  }

  /** The decision a cached record gives (replay or mismatch), if the replay cache holds one. */
  private fromCache(request: BeginRequest, now: number): Decision | undefined {
    const cached = this.settings.replayCache?.get(request.id, now);
    if (!cached) return undefined;
    return cached.fingerprint === request.fingerprint
      ? { action: 'replay', response: cached.response }
      : MISMATCH;
  }

  private async decide(request: BeginRequest, cacheChecked = false): Promise<Decision> {
    const now = Date.now();
    const cached = cacheChecked ? undefined : this.fromCache(request, now);
    if (cached) return cached;
    // In wait mode duplicates may wait on this key: its completion or release must wake them.
    const watched = request.concurrency === 'wait';
    const readAt = this.settings.replayCache?.generation;
    const claimRequest: ClaimRequest = {
      id: request.id,
      fingerprint: request.fingerprint,
      token: randomUUID(),
      now,
      lockedUntil: now + request.lockTimeoutMs,
      ttlMs: request.ttlMs,
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
    if (claim.claimed && claim.takeover) this.events.emit({ type: 'taken-over', id: request.id });
    const decision = decisionOf(
      claim,
      request.fingerprint,
      now,
      (record, stored) => this.opened(request.id, record, stored),
      watched,
    );
    if (decision.action === 'replay' && !claim.claimed)
      this.settings.replayCache?.set(
        request.id,
        {
          fingerprint: claim.record.fingerprint,
          token: claim.record.token,
          expiresAt: claim.record.expiresAt,
          response: decision.response,
        },
        readAt,
      );
    return decision;
  }

  /**
   * A stored response opened for replay, or `undefined` (reported as `unreadable`, without the
   * body) when it cannot be: sealed under keys that are not configured, tampered with, copied from
   * another record, or sealed while encryption is off (and unsealed while it is on, unless
   * `acceptUnsealed`).
   */
  private opened(
    id: RecordId,
    record: RecordSnapshot,
    stored: StoredResponse,
  ): StoredResponse | undefined {
    const { sealer } = this.settings;
    try {
      return sealer
        ? sealer.open({ id, fingerprint: record.fingerprint, token: record.token }, stored)
        : openUnencrypted(stored);
    } catch (error) {
      if (!(error instanceof UnreadableResponseError)) throw error;
      this.events.emit({ type: 'unreadable', id, reason: error.message });
      return undefined;
    }
  }

  /**
   * The claim, within `storeTimeout`. A claim the store answers later, once its request was refused
   * (503), is released as soon as it lands: nobody runs it, and it would lock the key against the
   * client's retry for lockTimeout.
   */
  private async claimWithin(request: ClaimRequest, watched: boolean): Promise<ClaimResult> {
    const claiming = this.store.claim(request);
    try {
      return await withinStoreTimeout(claiming, this.settings.storeTimeoutMs);
    } catch (error) {
      if (error instanceof StoreTimeoutError) {
        claiming.then(
          (late) => {
            if (!late.claimed) return;
            const lease = watched ? { ...late.lease, watched: true } : late.lease;
            this.store.release(lease).then(
              () => this.events.emit({ type: 'late-claim-released', id: lease.id }),
              () => undefined,
            );
          },
          () => undefined,
        );
      }
      throw error;
    }
  }
}

const MISMATCH: Decision = { action: 'mismatch' };

/** The claim span's outcome for each decision (the metric's name of it). */
const TRACED_OUTCOMES: Record<Decision['action'], string> = {
  execute: 'executed',
  replay: 'replayed',
  mismatch: 'mismatch',
  'in-progress': 'conflict',
  unreadable: 'unreadable',
};
