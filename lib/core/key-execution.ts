import type { EntityManager } from 'typeorm';
import type { Lease } from '../storage/idempotency-store.interface.js';
import type { KeyCompletion } from './key-completion.js';
import type { KeyEvents } from './key-events.js';
import type { KeyTransaction } from './key-transaction.js';
import type { LeaseKeeper } from './lease-keeper.js';
import { settled } from './outcome.js';
import type { CaptureOutcome, ExecuteOptions, RunAsOperation } from './types.js';

/**
 * The run of a claimed key: the handler, as the key's operation, with its lease kept, then its
 * outcome stored or its key released (plain mode), or all of it in one transaction.
 */
export class KeyExecution {
  constructor(
    private readonly leases: LeaseKeeper,
    private readonly completion: KeyCompletion,
    private readonly transaction: KeyTransaction,
    private readonly events: KeyEvents,
    private readonly runAsOperation: RunAsOperation,
  ) {}

  /**
   * Runs the handler of a claimed key (`run`, given the transaction's EntityManager in
   * transactional mode) as the key's operation, then stores what `capture` makes of its outcome or
   * releases the key. The claim is renewed until its result is stored or the key released (retries
   * included), so no duplicate takes the key over while a slow store is still writing the result.
   * Resolves to the handler's value or rejects with its error, as the handler did; in transactional
   * mode it may also reject with `LeaseLostError`, `UnstoredResultError` or
   * `TransactionUnavailableError` (nothing was committed).
   */
  async execute(
    lease: Lease,
    fingerprint: string,
    route: ExecuteOptions,
    run: () => Promise<unknown>,
    capture: CaptureOutcome,
  ): Promise<unknown> {
    const renewal = this.leases.hold(lease, route);
    const operation = (entityManager?: EntityManager): Promise<unknown> => {
      const running = { ...lease.id, fingerprint, entityManager };
      if (!this.events.tracing) {
        try {
          return this.runAsOperation(running, run);
        } catch (error) {
          return Promise.reject(error);
        }
      }
      return this.events.step(
        'run',
        lease.id,
        async (traced) => {
          const outcome = await settled(this.runAsOperation(running, run));
          traced.outcome(outcome.ok ? 'returned' : 'threw');
          if (!outcome.ok) throw outcome.error;
          return outcome.value;
        },
        true,
      );
    };
    try {
      if (route.transactional)
        return await this.transaction.run(lease, route.ttlMs, renewal, operation, capture);
      const outcome = await settled(operation());
      renewal.settling = true;
      // Renewed until the result is stored, its capture included (GraphQL awaits lazy fields).
      await this.completion.settle(lease, await capture(outcome), route.ttlMs, renewal);
      if (!outcome.ok) throw outcome.error;
      return outcome.value;
    } finally {
      renewal.stop();
    }
  }
}
