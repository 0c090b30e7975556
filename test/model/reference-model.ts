/**
 * The reference model of the model-based suite: the life of each key as the README describes it,
 * in a few dozen lines, with no transport and no store. For every request it predicts whether the
 * handler runs (and which run of its record that is), replays a stored result, or is refused; it
 * keeps each record's state, the process's replay cache, and the handler runs per record.
 *
 * ```
 *   none ──claim──▶ in-progress(owner, lockedUntil) ──complete──▶ completed(payload, result, expiresAt)
 *    ▲                │        │    ▲                                   │
 *    └──release───────┘        │    └─ takeover: lockedUntil ≤ now,     │ expiresAt ≤ now:
 *      (a status the policy    │       same payload (new owner)         │ the next claim takes it over
 *       does not keep, a crash)└─ renew (main route): lockedUntil = now + lockTimeout
 *   forget (the row deleted by hand): → none; the replay cache may still hold it (README "How it works")
 *   waiting route (concurrency 'wait'): a duplicate in progress waits; when the first stores its
 *   result every waiter replays it; when it releases the key one waiter runs, the others replay
 *   that; a waiter whose waitTimeout ends first gets 409
 *   purge: every record whose lock or TTL ended → none
 * ```
 *
 * Decisions, in the order the module takes them: a live replay-cache entry answers alone (replay,
 * or 422 for another payload); no record → run; in progress → run if its lock ended and the payload
 * is the same (takeover), else 422 for another payload, else 409; completed → run if its TTL ended,
 * else 422 for another payload, else replay (and the replay is cached).
 */
import {
  lockTimeoutOf,
  TTL_MS,
  WAIT_TIMEOUT_MS,
  type Outcome,
  type RouteName,
} from './model-app.js';

/** One record: a route (endpoint), a scope and a key. */
export interface RecordRef {
  readonly route: RouteName;
  /** The scope as the module stores it (a string). */
  readonly scope: string;
  readonly key: string;
}

export const recordName = ({ route, scope, key }: RecordRef) =>
  `${route}|${JSON.stringify(scope)}|${JSON.stringify(key)}`;

/** What a handler run produced: its outcome, which run of its record it was, and its payload. */
export interface RunResult {
  readonly outcome: Outcome;
  readonly run: number;
  readonly p: number;
}

type RecordState =
  | {
      readonly state: 'in-progress';
      readonly p: number;
      /** The execution holding the lease. */
      readonly owner: number;
      lockedUntil: number;
      /** `waiting` route: duplicates waiting for the owner to finish, oldest first. */
      waiters: Waiter[];
    }
  | {
      readonly state: 'completed';
      readonly p: number;
      readonly result: RunResult;
      readonly expiresAt: number;
    };

interface CacheEntry {
  readonly p: number;
  readonly result: RunResult;
  readonly expiresAt: number;
}

export type RejectionCode = 'key-missing' | 'key-reused' | 'request-in-progress';

/** What the client of one request is predicted to get. */
export type Prediction =
  | { readonly kind: 'rejected'; readonly code: RejectionCode }
  | { readonly kind: 'executes'; readonly execution: Execution; readonly takeover: boolean }
  | { readonly kind: 'replays'; readonly result: RunResult; readonly fromCache: boolean }
  /** `waiting` route: a duplicate while the first runs waits (see `Resolution`). */
  | { readonly kind: 'waits'; readonly waiter: Waiter };

/** A duplicate waiting on the `waiting` route (`concurrency: 'wait'`). */
export interface Waiter {
  readonly ref: RecordRef;
  readonly p: number;
  /** Its waitTimeout ends then (the app's clock). */
  readonly deadline: number;
}

/**
 * How a waiter's wait ended: the first request's stored result replays; or, the key released (or
 * its row deleted), one waiter claims it and runs the handler (with no plan: `ok`) and the others
 * replay that; or the waitTimeout passed while the first still runs: 409.
 */
export interface Resolution {
  readonly waiter: Waiter;
  readonly answer:
    | { readonly kind: 'replays'; readonly result: RunResult }
    | { readonly kind: 'ran'; readonly result: RunResult }
    | { readonly kind: 'rejected'; readonly code: 'request-in-progress' };
}

/** A handler run that claimed its record (and, when held, is still running). */
export interface Execution {
  readonly serial: number;
  readonly ref: RecordRef;
  readonly p: number;
  readonly run: number;
}

/** How a record should look in the store. */
export type ExpectedRow =
  | undefined
  | { readonly state: 'in_progress'; readonly expiresAt: number }
  | { readonly state: 'completed'; readonly expiresAt: number; readonly result: RunResult };

export class ReferenceModel {
  private readonly records = new Map<string, RecordState>();
  private readonly cache = new Map<string, CacheEntry>();
  private readonly runCounts = new Map<string, number>();
  private serials = 0;
  /** Executions whose handler is held (in flight), oldest first. */
  readonly held: Execution[] = [];
  /** The requests sent so far, as the commands described them (for `retry` to send one again). */
  readonly sent: unknown[] = [];
  /** The command whose request started each held execution (for `crash` to retry it). */
  readonly startedBy = new Map<Execution, unknown>();
  /** Every record a request of this run touched. */
  readonly touched = new Map<string, RecordRef>();
  /** How often each kind of situation came up (reported by the spec, to show what was covered). */
  readonly events = new Map<string, number>();
  /** Waits that ended since the last `takeResolutions` (by finish, forget or advance). */
  private resolutions: Resolution[] = [];

  /**
   * @param now the app's clock at the start (epoch ms; frozen, moved only by `advance`)
   * @param stores whether the route keeps an outcome (the storeStatuses policy of the transport)
   */
  constructor(
    public now: number,
    private readonly stores: (outcome: Outcome) => boolean,
  ) {}

  /** A request with the key arrives: the decision, applied to the state. */
  begin(ref: RecordRef, p: number): Prediction {
    const prediction = this.decide(ref, p);
    const event =
      prediction.kind === 'rejected'
        ? prediction.code
        : prediction.kind === 'waits'
          ? 'waits'
          : prediction.kind === 'executes'
            ? prediction.takeover
              ? 'takeover'
              : 'run'
            : prediction.fromCache
              ? this.records.has(recordName(ref))
                ? 'replay from the cache'
                : 'replay of a forgotten row from the cache'
              : 'replay';
    this.count(event);
    return prediction;
  }

  count(event: string): void {
    this.events.set(event, (this.events.get(event) ?? 0) + 1);
  }

  private decide(ref: RecordRef, p: number): Prediction {
    const name = recordName(ref);
    this.touched.set(name, ref);
    const cached = this.cache.get(name);
    if (cached && cached.expiresAt > this.now) {
      return cached.p === p
        ? { kind: 'replays', result: cached.result, fromCache: true }
        : { kind: 'rejected', code: 'key-reused' };
    }
    if (cached) this.cache.delete(name);
    const record = this.records.get(name);
    if (record?.state === 'in-progress') {
      if (record.p !== p) return { kind: 'rejected', code: 'key-reused' };
      if (record.lockedUntil > this.now) {
        if (ref.route !== 'waiting') return { kind: 'rejected', code: 'request-in-progress' };
        const waiter: Waiter = { ref, p, deadline: this.now + WAIT_TIMEOUT_MS };
        record.waiters.push(waiter);
        return { kind: 'waits', waiter };
      }
    } else if (record?.state === 'completed' && record.expiresAt > this.now) {
      if (record.p !== p) return { kind: 'rejected', code: 'key-reused' };
      this.cache.set(name, { p, result: record.result, expiresAt: record.expiresAt });
      return { kind: 'replays', result: record.result, fromCache: false };
    }
    const execution = this.claim(ref, p);
    return { kind: 'executes', execution, takeover: record !== undefined };
  }

  private claim(ref: RecordRef, p: number): Execution {
    const name = recordName(ref);
    const run = (this.runCounts.get(name) ?? 0) + 1;
    this.runCounts.set(name, run);
    const execution: Execution = { serial: ++this.serials, ref, p, run };
    this.records.set(name, {
      state: 'in-progress',
      p,
      owner: execution.serial,
      lockedUntil: this.now + lockTimeoutOf(ref.route),
      waiters: [],
    });
    return execution;
  }

  private complete(execution: Execution, outcome: Outcome): RunResult {
    const result: RunResult = { outcome, run: execution.run, p: execution.p };
    const name = recordName(execution.ref);
    this.records.set(name, {
      state: 'completed',
      p: execution.p,
      result,
      expiresAt: this.now + TTL_MS,
    });
    return result;
  }

  /**
   * The waiters of a record whose first request ended: all replay a stored result; after a release
   * (or a deleted row) the first claims the key and runs (`ok`, stored) and the others replay that.
   */
  private wake(waiters: readonly Waiter[], stored: RunResult | undefined): void {
    if (waiters.length === 0) return;
    let result = stored;
    let rest = waiters;
    if (!result) {
      const [first, ...others] = waiters;
      result = this.complete(this.claim(first.ref, first.p), 'ok');
      this.resolutions.push({ waiter: first, answer: { kind: 'ran', result } });
      this.count('a waiter ran');
      rest = others;
    }
    this.count('waiters woken');
    // Each replays from the store, and caches the record as a replay does.
    const expiresAt = this.now + TTL_MS;
    for (const waiter of rest) {
      this.cache.set(recordName(waiter.ref), { p: waiter.p, result, expiresAt });
      this.resolutions.push({ waiter, answer: { kind: 'replays', result } });
    }
  }

  /** The waits that ended since the last call. */
  takeResolutions(): Resolution[] {
    const taken = this.resolutions;
    this.resolutions = [];
    return taken;
  }

  /** Whether a clock jump of `ms` would end a lock someone waits on (see AdvanceCommand). */
  lapsesAWaitedLock(ms: number): boolean {
    return [...this.records.values()].some(
      (record) =>
        record.state === 'in-progress' &&
        record.waiters.length > 0 &&
        record.lockedUntil <= this.now + ms,
    );
  }

  /** The handler of `execution` ends with `outcome`: stored or released, if it still holds its lease. */
  finish(execution: Execution, outcome: Outcome): RunResult {
    const name = recordName(execution.ref);
    const index = this.held.indexOf(execution);
    if (index >= 0) this.held.splice(index, 1);
    const result: RunResult = { outcome, run: execution.run, p: execution.p };
    if (!this.holdsLease(execution)) {
      this.count('finished without its lease');
      return result; // taken over or forgotten: nothing is written
    }
    this.count(this.stores(outcome) ? 'stored' : 'released');
    const { waiters } = this.records.get(name) as { waiters: Waiter[] };
    if (this.stores(outcome)) {
      this.wake(waiters, this.complete(execution, outcome));
    } else {
      this.records.delete(name);
      this.wake(waiters, undefined);
    }
    return result;
  }

  holdsLease(execution: Execution): boolean {
    const record = this.records.get(recordName(execution.ref));
    return record?.state === 'in-progress' && record.owner === execution.serial;
  }

  /**
   * The clock moves on. Held handlers of the `main` route renew their lease (the test waits for
   * the renewal to land); the `crashy` route's do not, so their locks run out.
   */
  advance(ms: number): Execution[] {
    this.now += ms;
    const renewing = this.held.filter(
      (execution) => execution.ref.route === 'main' && this.holdsLease(execution),
    );
    if (renewing.length > 0) this.count('renewal across a clock jump');
    for (const execution of renewing) {
      const record = this.records.get(recordName(execution.ref));
      if (record?.state === 'in-progress') record.lockedUntil = this.now + lockTimeoutOf('main');
    }
    // Waiters whose waitTimeout ended give up (the lock they wait on is live: see lapsesAWaitedLock).
    for (const record of this.records.values()) {
      if (record.state !== 'in-progress') continue;
      const expired = record.waiters.filter((waiter) => waiter.deadline <= this.now);
      if (expired.length === 0) continue;
      this.count('waits timed out');
      record.waiters = record.waiters.filter((waiter) => waiter.deadline > this.now);
      for (const waiter of expired)
        this.resolutions.push({
          waiter,
          answer: { kind: 'rejected', code: 'request-in-progress' },
        });
    }
    return renewing;
  }

  /** The row is deleted by hand; the replay cache is left as it is. */
  forget(ref: RecordRef): void {
    const name = recordName(ref);
    this.touched.set(name, ref);
    this.count('forget');
    const record = this.records.get(name);
    this.records.delete(name);
    if (record?.state === 'in-progress') this.wake(record.waiters, undefined);
  }

  /** The purge job runs: every record whose lock or TTL ended by now is deleted. */
  purge(): number {
    let purged = 0;
    for (const [name, record] of this.records) {
      const end = record.state === 'in-progress' ? record.lockedUntil : record.expiresAt;
      if (end > this.now) continue;
      this.records.delete(name);
      purged++;
    }
    if (purged > 0) this.count('purged');
    return purged;
  }

  /** Records that exist now (for `forget` to pick from), the completed ones first. */
  existing(): RecordRef[] {
    const existing = [...this.touched.values()].filter((ref) => this.records.has(recordName(ref)));
    const completed = (ref: RecordRef) => this.records.get(recordName(ref))?.state === 'completed';
    return [...existing.filter(completed), ...existing.filter((ref) => !completed(ref))];
  }

  runs(ref: RecordRef): number {
    return this.runCounts.get(recordName(ref)) ?? 0;
  }

  row(ref: RecordRef): ExpectedRow {
    const record = this.records.get(recordName(ref));
    if (!record) return undefined;
    return record.state === 'in-progress'
      ? { state: 'in_progress', expiresAt: record.lockedUntil }
      : { state: 'completed', expiresAt: record.expiresAt, result: record.result };
  }
}
