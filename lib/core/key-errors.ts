import type { Lease } from '../storage/idempotency-store.interface.js';
import { timerDelay } from '../utils/duration.js';

/**
 * The lease of a transactional route was lost before its completion (taken over after its lock
 * timed out): the transaction was rolled back, nothing of this attempt was committed. Each
 * transport renders it (HTTP: 409 problem `lease-lost`).
 */
export class LeaseLostError extends Error {
  constructor(
    /** The lost claim: the record now belongs to another request. */
    readonly lease: Lease,
  ) {
    super('the claim on this key was taken over by another request; this attempt was rolled back');
  }
}

/**
 * A transactional route produced a result that is not stored (a status the policy does not keep,
 * a response over maxResponseBytes, a stream): its writes were rolled back and its key released,
 * since committing them without a stored response would let a retry run them again.
 */
export class UnstoredResultError extends Error {
  constructor(
    /** The claim of the attempt, released after the rollback. */
    readonly lease: Lease,
  ) {
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
    /**
     * The claim of the attempt, released after the rollback (a record that a COMMIT completed
     * before its answer was lost stays completed).
     */
    readonly lease: Lease,
    /** The connection error: from the handler's statements, or the BEGIN, completion or COMMIT. */
    override readonly cause: unknown,
  ) {
    super('the database connection of this transactional route failed; nothing was committed');
  }
}

/** The store did not answer within `storeTimeout` (the operation itself may still finish later). */
export class StoreTimeoutError extends Error {}

/**
 * `operation`, or a `StoreTimeoutError` once `timeoutMs` has passed (the operation itself may still
 * finish later). One timer and one promise per call.
 */
export function withinStoreTimeout<T>(operation: Promise<T>, timeoutMs: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new StoreTimeoutError(`store did not answer within ${timeoutMs} ms`)),
      timerDelay(timeoutMs),
    );
    operation.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}
