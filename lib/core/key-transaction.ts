import { HttpException } from '@nestjs/common';
import type { EntityManager } from 'typeorm';
import { isConnectionFailure, isDatabaseConnectionFailure } from '../storage/connection-failure.js';
import type {
  IdempotencyStore,
  Lease,
  StoreTransaction,
} from '../storage/idempotency-store.interface.js';
import type { KeyCompletion } from './key-completion.js';
import {
  LeaseLostError,
  StoreTimeoutError,
  TransactionUnavailableError,
  UnstoredResultError,
  withinStoreTimeout,
} from './key-errors.js';
import type { KeyEvents } from './key-events.js';
import { reportLostLease, type LeaseRenewal } from './lease-keeper.js';
import { settled, type Outcome } from './outcome.js';
import type { CaptureOutcome } from './types.js';

/**
 * The transactional mode of a claimed key. The claim is committed already; the handler's writes and
 * the completion share one transaction, the completion (conditional on the lease) as its last
 * statement, so the record reaches COMPLETED exactly when the writes commit. A handler that throws
 * rolls its writes back, then its outcome is stored or released as in the plain mode. The claim is
 * renewed until the completion has run in the transaction (from then on the transaction holds the
 * record's row: a claim waits for it to end), and through the storing or release that follows a
 * rollback.
 */
export class KeyTransaction {
  constructor(
    private readonly store: Pick<IdempotencyStore, 'transaction'>,
    private readonly storeTimeoutMs: number,
    private readonly completion: KeyCompletion,
    private readonly events: KeyEvents,
  ) {}

  /**
   * Runs `operation` and the completion in one transaction. Resolves to the handler's value or
   * rejects with its error; or with `LeaseLostError`, `UnstoredResultError` or
   * `TransactionUnavailableError` (nothing was committed).
   */
  async run(
    lease: Lease,
    ttlMs: number,
    renewal: LeaseRenewal,
    operation: (entityManager: EntityManager) => Promise<unknown>,
    capture: CaptureOutcome,
  ): Promise<unknown> {
    if (!this.store.transaction)
      throw new Error('nestjs-idempotency: this store has no transactional mode');
    /** The handler threw (its writes are rolled back): what it threw. */
    let failed: Extract<Outcome, { ok: false }> | undefined;
    /** What the handler threw came from the transaction's own connection failing. */
    let connectionLost = false;
    try {
      return await this.store.transaction(async (transaction) => {
        const outcome = await settled(operation(transaction.manager));
        renewal.settling = true;
        if (!outcome.ok) {
          failed = outcome;
          connectionLost = await this.lostItsConnection(transaction, outcome.error);
          throw outcome.error;
        }
        const response = await capture(outcome);
        if (!response) throw new UnstoredResultError(lease);
        await this.events.step('complete', lease.id, async (traced) => {
          const stored = await transaction.complete(
            lease,
            this.completion.sealed(lease, response),
            Date.now() + ttlMs,
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
        this.events.emit({ type: 'connection-lost', id: lease.id, cause });
        // If only the COMMIT's answer was lost, the record is completed: the release finds it so.
        await this.completion.release(lease, renewal, undefined, true);
        throw new TransactionUnavailableError(lease, cause);
      }
      if (handlerError) {
        await this.completion.settle(lease, await capture(handlerError), ttlMs, renewal);
        throw handlerError.error;
      }
      if (error instanceof LeaseLostError) {
        reportLostLease(
          this.events,
          lease,
          renewal,
          'its transaction was rolled back and nothing of this attempt was committed',
        );
        throw error;
      }
      // Not stored, or the transaction itself failed (BEGIN, the completion, COMMIT): whether or not
      // it committed, the release is right — it deletes only a record still in progress, which a
      // committed completion is not.
      await this.completion.release(
        lease,
        renewal,
        undefined,
        !(error instanceof UnstoredResultError),
      );
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
      await withinStoreTimeout(transaction.manager.query('SELECT 1'), this.storeTimeoutMs);
      return false;
    } catch (probe) {
      return probe instanceof StoreTimeoutError || isConnectionFailure(probe);
    }
  }
}
