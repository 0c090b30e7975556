import { setTimeout as sleep } from 'node:timers/promises';
import type { ResponseSealer } from '../security/response-sealer.js';
import type {
  IdempotencyStore,
  Lease,
  LeaseState,
  StoredResponse,
} from '../storage/idempotency-store.interface.js';
import { withinStoreTimeout } from './key-errors.js';
import type { KeyEvents, TracedStep } from './key-events.js';
import { reportLostLease, type LeaseRenewal } from './lease-keeper.js';

/** How often, and how far apart, a failed write of a result is tried again. */
export const WRITE_RETRY_DELAYS_MS: readonly number[] = [0, 50, 250, 1000];

/**
 * The end of a key that ran: its response sealed and stored under the lease (`complete`), or the
 * key given up (`release`), each retried on failure and never throwing — the handler's answer goes
 * back to the client either way.
 */
export class KeyCompletion {
  constructor(
    private readonly store: Pick<IdempotencyStore, 'complete' | 'release' | 'leaseState'>,
    private readonly storeTimeoutMs: number,
    private readonly sealer: ResponseSealer | undefined,
    private readonly events: KeyEvents,
    private readonly retryDelaysMs: readonly number[] = WRITE_RETRY_DELAYS_MS,
  ) {}

  /** The step `complete` around storing `response`, or releasing the key when it is `null`. */
  settle(
    lease: Lease,
    response: StoredResponse | null,
    ttlMs: number,
    renewal: LeaseRenewal,
  ): Promise<void> {
    return this.events.step('complete', lease.id, (traced) =>
      response
        ? this.complete(lease, response, ttlMs, renewal, traced)
        : this.release(lease, renewal, traced),
    );
  }

  /**
   * Stores the handler's response under the lease (plain mode). A failed write is retried; if it
   * still fails the record stays in progress until its lock times out, and the next retry after
   * that runs the handler again — reported as `write-failed` (the transactional mode has no such
   * case: its completion commits with the handler's writes). A retry that finds the response
   * stored already (an earlier attempt whose answer was lost) counts as done. Never throws.
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
        (await this.timed(this.store.complete(lease, sealed, Date.now() + ttlMs))) ||
        (uncertain && (await this.leaseStateOf(lease)) === 'completed');
      traced?.outcome(stored ? 'stored' : 'lease-lost');
      if (!stored) reportLostLease(this.events, lease, renewal, 'its response was not stored');
    });
  }

  /**
   * Gives the key up so a retry runs the handler again. Never throws (see `complete`).
   * `uncertain`: an earlier write may have ended the lease already (a COMMIT whose answer was
   * lost), so finding the record gone or completed under this lease is not a lost lease.
   */
  async release(
    lease: Lease,
    renewal?: LeaseRenewal,
    traced?: TracedStep,
    uncertain = false,
  ): Promise<void> {
    traced?.outcome('failed');
    await this.writeWithRetry(lease, 'release', uncertain, async (retried) => {
      const released = await this.timed(this.store.release(lease));
      const state = released || !retried ? undefined : await this.leaseStateOf(lease);
      traced?.outcome(released || state === 'absent' ? 'released' : 'lease-lost');
      if (released || state === 'absent') this.events.emit({ type: 'released', id: lease.id });
      else if (state === 'completed')
        this.events.emit({ type: 'commit-answer-lost', id: lease.id });
      else reportLostLease(this.events, lease, renewal, 'it was not released');
    });
  }

  /** The response as the store keeps it: sealed when encryption is on. */
  sealed(lease: Lease, response: StoredResponse): StoredResponse {
    if (!this.sealer) return response;
    if (lease.fingerprint === undefined)
      throw new TypeError(
        'nestjs-idempotency: a lease to seal a response under has no fingerprint',
      );
    const { id, fingerprint, token } = lease;
    return this.sealer.seal({ id, fingerprint, token }, response);
  }

  /**
   * Where the lease stands, when the store can tell (`IdempotencyStore.leaseState`); `undefined`
   * otherwise.
   */
  private async leaseStateOf(lease: Lease): Promise<LeaseState | undefined> {
    return this.store.leaseState ? await this.timed(this.store.leaseState(lease)) : undefined;
  }

  private timed<T>(operation: Promise<T>): Promise<T> {
    return withinStoreTimeout(operation, this.storeTimeoutMs);
  }

  /**
   * Runs `write` until it does not throw, at most once per retry delay. `write` is told whether an
   * earlier write may have applied already without its answer reaching us: `uncertain` at first,
   * and on every retry (the attempt before threw: a timeout, a lost connection).
   */
  private async writeWithRetry(
    lease: Lease,
    what: string,
    uncertain: boolean,
    write: (uncertain: boolean) => Promise<void>,
  ): Promise<void> {
    const delays = this.retryDelaysMs;
    for (let attempt = 0; attempt < delays.length; attempt++) {
      if (delays[attempt] > 0) await sleep(delays[attempt]);
      try {
        return await write(uncertain || attempt > 0);
      } catch (error) {
        if (attempt === delays.length - 1)
          this.events.emit({
            type: 'write-failed',
            id: lease.id,
            what,
            attempts: attempt + 1,
            error,
          });
      }
    }
  }
}
