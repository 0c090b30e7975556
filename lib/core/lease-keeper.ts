import type { IdempotencyStore, Lease } from '../storage/idempotency-store.interface.js';
import { timerDelay } from '../utils/duration.js';
import { StoreTimeoutError } from './key-errors.js';
import type { KeyEvents } from './key-events.js';

/**
 * Renewals of one lease sent and neither answered nor given up on yet (each is given up on after
 * `min(storeTimeout, lockTimeout / 3)`), beyond which a beat sends none: a store that answers
 * nothing is not sent ever more statements.
 */
export const MAX_PENDING_RENEWALS = 2;

/** The renewal of one running handler's lease, as the rest of the core sees it. */
export interface LeaseRenewal {
  /** Renewal has ended: stopped, given up (renewal limit, lease lost), or never started. */
  readonly stopped: boolean;
  /**
   * The handler has settled and its result is being stored (or its key released): a renewal that
   * finds the lease gone may have been overtaken by that very write, so it is not a lost lease.
   */
  settling: boolean;
  /** The loss of this lease was logged and counted already. */
  lostReported: boolean;
  /** Ends renewal (idempotent). */
  stop(): void;
}

/** What the keeper needs of a route. */
export interface LeaseTerms {
  readonly lockTimeoutMs: number;
  /** 0: the claim is not renewed. */
  readonly lockRenewalLimitMs: number;
}

/**
 * Reports a lost lease (the event `lease-lost`), once per execution: its renewal may have found it
 * first.
 */
export function reportLostLease(
  events: KeyEvents,
  lease: Lease,
  renewal: LeaseRenewal | undefined,
  consequence: string,
): void {
  if (renewal?.lostReported) return;
  if (renewal) renewal.lostReported = true;
  events.emit({ type: 'lease-lost', id: lease.id, consequence });
}

/** A renewal that never runs (renewal is off for the route). */
function notRenewed(): LeaseRenewal {
  return { stopped: true, settling: false, lostReported: false, stop: () => undefined };
}

/** One held lease, renewed by its beat. */
class HeldLease implements LeaseRenewal {
  stopped = false;
  settling = false;
  lostReported = false;
  /** Monotonic ms: when the lease joined (the claim), and when the last confirmed renewal was sent. */
  readonly startedAt = performance.now();
  renewedAt = this.startedAt;
  /** Renewals sent and neither answered nor given up on. */
  pending = 0;
  lapseReported = false;

  constructor(
    readonly lease: Lease,
    readonly terms: LeaseTerms,
    private readonly beat: Beat,
  ) {}

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.beat.leases.delete(this);
  }
}

/** The renewals one beat sent, and the two timers that wait for them. */
interface BeatRenewals {
  /** Renewals not answered yet (nor failed): at 0 the timers are cleared. */
  open: number;
  patience: NodeJS.Timeout | undefined;
  deadline: NodeJS.Timeout | undefined;
}

/** A renewal of one beat still waiting for the store. */
interface Renewing {
  readonly held: HeldLease;
  /** Monotonic ms the renewal was sent at. */
  readonly sentAt: number;
  readonly batch: BeatRenewals;
  answered: boolean;
  givenUp: boolean;
}

/** Every lease renewed at one interval, by one timer. */
interface Beat {
  readonly intervalMs: number;
  readonly leases: Set<HeldLease>;
  timer: NodeJS.Timeout | undefined;
}

/**
 * Keeps the leases of the handlers running in this process: one timer per renewal interval (one in
 * all, for an app whose routes share a lockTimeout), which at each beat renews every lease due in
 * one synchronous loop — so a store that batches the statements of a tick could send one
 * statement per beat. (The TypeORM store batches claims and completions, not renewals: each lease
 * is one statement on the pool, all of a beat's sent at the same moment.)
 *
 * A lease is renewed at every beat, `lockTimeout / 3` apart (its first renewal at the first beat
 * after its claim, so at most a third of a lockTimeout after it, as with a timer per lease: a
 * later first renewal left too little of the lock for a slow store) until `stop()` (its result
 * stored or its key released), the renewal limit (unless it is settling: a handler whose result is
 * being stored is not hung), `stopAll()` (the app's close), or a renewal that finds the lease gone
 * (reported as lost unless it is settling: its own completion may have ended it). A renewal the
 * store does not answer within `min(storeTimeout, lockTimeout / 3)` does not hold the next one
 * back (at most `MAX_PENDING_RENEWALS` are left waiting). A lease the store could not renew for
 * lockTimeout may have been taken over: that is reported, renewal goes on (one that lands while
 * nobody took the key over holds it again), and the completion, conditional on the lease, finds
 * out. An idle timer stops itself at its next beat.
 */
export class LeaseKeeper {
  private readonly beats = new Map<number, Beat>();

  constructor(
    private readonly store: Pick<IdempotencyStore, 'renew'>,
    private readonly storeTimeoutMs: number,
    private readonly events: KeyEvents,
  ) {}

  /** Starts renewing `lease` (a lease of a route with renewal off is returned stopped). */
  hold(lease: Lease, terms: LeaseTerms): LeaseRenewal {
    if (terms.lockRenewalLimitMs <= 0 || terms.lockTimeoutMs <= 0) return notRenewed();
    const intervalMs = timerDelay(Math.max(1, Math.floor(terms.lockTimeoutMs / 3)));
    let beat = this.beats.get(intervalMs);
    if (!beat) {
      beat = { intervalMs, leases: new Set(), timer: undefined };
      this.beats.set(intervalMs, beat);
    }
    if (!beat.timer) {
      const ticking = beat;
      beat.timer = setInterval(() => this.beat(ticking), intervalMs);
      beat.timer.unref();
    }
    const held = new HeldLease(lease, terms, beat);
    beat.leases.add(held);
    return held;
  }

  /** How many leases are being renewed. */
  get held(): number {
    let count = 0;
    for (const beat of this.beats.values()) count += beat.leases.size;
    return count;
  }

  /** Stops every renewal and timer (the app has closed). */
  stopAll(): void {
    for (const beat of this.beats.values()) {
      for (const held of beat.leases) held.stop();
      clearInterval(beat.timer);
      beat.timer = undefined;
    }
    this.beats.clear();
  }

  /** One beat: renews, in one synchronous loop, every lease of `beat` that is due. */
  private beat(beat: Beat): void {
    if (beat.leases.size === 0) {
      clearInterval(beat.timer);
      beat.timer = undefined;
      this.beats.delete(beat.intervalMs);
      return;
    }
    const now = Date.now();
    // How long a handler ran is measured on the monotonic clock: a step of the wall clock (NTP,
    // a VM resumed) is no time spent. Locks are wall-clock times, as every process reads them.
    const elapsed = performance.now();
    let renewing: Renewing[] | undefined;
    const batch: BeatRenewals = { open: 0, patience: undefined, deadline: undefined };
    for (const held of beat.leases) {
      const { lease, terms } = held;
      if (!held.settling && elapsed - held.startedAt >= terms.lockRenewalLimitMs) {
        held.stop();
        this.events.emit({
          type: 'renewal-limit',
          id: lease.id,
          lockRenewalLimitMs: terms.lockRenewalLimitMs,
          lockTimeoutMs: terms.lockTimeoutMs,
        });
        continue;
      }
      if (!held.lapseReported && elapsed - held.renewedAt >= terms.lockTimeoutMs) {
        held.lapseReported = true;
        this.events.emit({
          type: 'renewal-lapsed',
          id: lease.id,
          lockTimeoutMs: terms.lockTimeoutMs,
        });
      }
      if (held.pending >= MAX_PENDING_RENEWALS) continue;
      held.pending++;
      batch.open++;
      const entry: Renewing = { held, sentAt: elapsed, batch, answered: false, givenUp: false };
      (renewing ??= []).push(entry);
      let sent: Promise<boolean>;
      try {
        // A store that answers without a promise (JavaScript, `any`) is answered all the same.
        sent = Promise.resolve(this.store.renew(lease, now + terms.lockTimeoutMs));
      } catch (error) {
        sent = Promise.reject(error);
      }
      sent.then(
        (renewed) => this.answered(entry, renewed),
        (error: unknown) => this.failed(entry, error),
      );
    }
    if (!renewing) return;
    const sentNow = renewing;
    const patienceMs = Math.min(this.storeTimeoutMs, beat.intervalMs);
    // One timer per beat, not per lease: a renewal left unanswered no longer holds the next back...
    // (Both timers are cleared once every renewal of the beat is answered: nothing of a beat, nor
    // of the leases it renewed, is kept for storeTimeout after its answers.)
    batch.patience = setTimeout(() => {
      for (const entry of sentNow) {
        if (entry.answered || entry.givenUp) continue;
        entry.givenUp = true;
        entry.held.pending--;
      }
    }, timerDelay(patienceMs)).unref();
    // ...and past storeTimeout it counts as failed (its answer, if it ever comes, is ignored).
    batch.deadline = setTimeout(() => {
      for (const entry of sentNow) {
        if (entry.answered) continue;
        this.failed(
          entry,
          new StoreTimeoutError(`store did not answer within ${this.storeTimeoutMs} ms`),
        );
      }
    }, timerDelay(this.storeTimeoutMs)).unref();
  }

  private settle(entry: Renewing): boolean {
    if (entry.answered) return false;
    entry.answered = true;
    const { batch } = entry;
    if (--batch.open === 0) {
      clearTimeout(batch.patience);
      clearTimeout(batch.deadline);
    }
    if (!entry.givenUp) {
      entry.givenUp = true;
      entry.held.pending--;
    }
    return true;
  }

  private answered(entry: Renewing, renewed: boolean): void {
    if (!this.settle(entry)) return;
    const { held } = entry;
    if (held.stopped) return;
    if (renewed) {
      held.renewedAt = Math.max(held.renewedAt, entry.sentAt);
      held.lapseReported = false;
      return;
    }
    // Its own completion or release may have ended the lease: the result of that tells.
    if (held.settling) return;
    held.stop();
    reportLostLease(this.events, held.lease, held, 'its result will not be stored');
  }

  private failed(entry: Renewing, error: unknown): void {
    if (!this.settle(entry)) return;
    if (!entry.held.stopped)
      this.events.emit({ type: 'renewal-failed', id: entry.held.lease.id, error });
  }
}
