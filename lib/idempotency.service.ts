import { Inject, Injectable, type OnApplicationShutdown } from '@nestjs/common';
import { KeyCompletion } from './core/key-completion.js';
import { KeyEvents, type TracedStep } from './core/key-events.js';
import { KeyExecution } from './core/key-execution.js';
import { KeyStateMachine } from './core/key-state-machine.js';
import { KeyTransaction } from './core/key-transaction.js';
import { LeaseKeeper, type LeaseRenewal } from './core/lease-keeper.js';
import type {
  BeginRequest,
  CaptureOutcome,
  CoreSettings,
  Decision,
  ExecuteOptions,
} from './core/types.js';
import { runAsOperation } from './idempotency.context.js';
import { RESOLVED_OPTIONS } from './idempotency.options.js';
import {
  IdempotencyStore,
  type Lease,
  type StoredResponse,
} from './storage/idempotency-store.interface.js';

export {
  LeaseLostError,
  TransactionUnavailableError,
  UnstoredResultError,
} from './core/key-errors.js';
export type {
  BeginRequest,
  CaptureOutcome,
  Decision,
  ExecuteOptions,
  Outcome,
} from './core/types.js';

/**
 * The module's entry to the key's state machine (`lib/core/`, where its diagram is): claim and
 * decide (`begin`), run and settle (`execute`), or settle by hand (`complete`, `release`). It only
 * wires the core's pieces to the module's store, options and observers.
 */
@Injectable()
export class IdempotencyService implements OnApplicationShutdown {
  private readonly machine: KeyStateMachine;
  private readonly leases: LeaseKeeper;
  private readonly completion: KeyCompletion;
  private readonly execution: KeyExecution;

  constructor(
    @Inject(IdempotencyStore) store: IdempotencyStore,
    @Inject(RESOLVED_OPTIONS) settings: CoreSettings,
    events: KeyEvents,
  ) {
    const { storeTimeoutMs, sealer } = settings;
    this.machine = new KeyStateMachine(store, settings, events);
    this.leases = new LeaseKeeper(store, storeTimeoutMs, events);
    this.completion = new KeyCompletion(store, storeTimeoutMs, sealer, events);
    const transaction = new KeyTransaction(store, storeTimeoutMs, this.completion, events);
    this.execution = new KeyExecution(
      this.leases,
      this.completion,
      transaction,
      events,
      runAsOperation,
    );
  }

  /**
   * Claims the key or reads its record, and decides (see `KeyStateMachine.begin`). In `'wait'`
   * mode a request that finds the key in progress waits until the first finishes, gives the key
   * up, or the wait runs out. Errors of the store propagate: without a decision the handler must
   * not run.
   */
  begin(request: BeginRequest): Promise<Decision> {
    return this.machine.begin(request);
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
  execute(
    lease: Lease,
    fingerprint: string,
    route: ExecuteOptions,
    run: () => Promise<unknown>,
    capture: CaptureOutcome,
  ): Promise<unknown> {
    return this.execution.execute(lease, fingerprint, route, run, capture);
  }

  /**
   * Stores the handler's response under the lease (plain mode), retried on failure; a lease found
   * lost is reported. Never throws: the handler's response goes back to the client either way.
   */
  complete(
    lease: Lease,
    response: StoredResponse,
    ttlMs: number,
    renewal?: LeaseRenewal,
    traced?: TracedStep,
  ): Promise<void> {
    return this.completion.complete(lease, response, ttlMs, renewal, traced);
  }

  /** Gives the key up so a retry runs the handler again. Never throws (see `complete`). */
  release(lease: Lease, renewal?: LeaseRenewal, traced?: TracedStep): Promise<void> {
    return this.completion.release(lease, renewal, traced);
  }

  /**
   * Stops every renewal once the app has closed: a process going down must not keep its keys
   * locked. Not before: Nest closes the HTTP server after `beforeApplicationShutdown` and waits
   * for the requests in flight, whose handlers still run and store their results; a lock left to
   * run out meanwhile would let another instance run the same handler a second time.
   */
  onApplicationShutdown(): void {
    this.leases.stopAll();
  }
}
