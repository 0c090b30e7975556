import {
  rejection,
  type IdempotencyRejection,
  type RejectionCode,
} from './idempotency-rejection.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';

/** Which call an {@link IdempotencyRunError} is about. */
export interface IdempotencyRunErrorDetails {
  /** The operation's name, as given to `run` (or the method's, the queue's). */
  readonly name: string;
  /** The key, as given (the message shows only its first characters). */
  readonly key: string;
  /** What caused it (the store's error, for `IdempotencyStoreUnavailableError`). */
  readonly cause?: unknown;
}

/**
 * Why `IdempotencyRunner.run` (or an `@IdempotentMethod()`, an `IdempotentWorkerHost`) did not run
 * the work and return its result. Not an HTTP exception: it says what happened (`code`, the same
 * codes as the HTTP problems and RPC errors; `rejection`, the neutral value a transport renders)
 * and when a retry may succeed (`retryAfterMs`; `undefined`: retrying the same call fails again).
 * Catch a subclass for one case, this class for all.
 */
export class IdempotencyRunError extends Error {
  /** The rejection's code (`request-in-progress`, `key-reused`, `store-unavailable`, …). */
  readonly code: RejectionCode;
  /** The same case as the transports render it (HTTP status, title, detail). */
  readonly rejection: IdempotencyRejection;
  /** The operation's name. */
  readonly operation: string;
  /** The key. */
  readonly key: string;
  /**
   * How long to wait before the same call (same key, same payload) may succeed, in ms;
   * `undefined` when it would fail again however often it is retried.
   */
  readonly retryAfterMs: number | undefined;

  constructor(
    code: RejectionCode,
    details: IdempotencyRunErrorDetails,
    what: string,
    retryAfterMs: number | undefined,
  ) {
    const when =
      retryAfterMs === undefined
        ? 'Retrying the same call will not help.'
        : `Retry the same call (same key and payload) in ${retryAfterMs} ms.`;
    super(
      `nestjs-idempotency: ${details.name} with key ${truncateKeyForLog(details.key)}: ${what} ${when}`,
      details.cause === undefined ? undefined : { cause: details.cause },
    );
    this.name = new.target.name;
    this.code = code;
    this.rejection = rejection(code, {
      retryAfterSeconds: retryAfterMs === undefined ? undefined : Math.ceil(retryAfterMs / 1000),
    });
    this.operation = details.name;
    this.key = details.key;
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * Another call with this key is still running (in this process or another), and the wait, if
 * `concurrency: 'wait'`, ran out. Retry after `retryAfterMs` to receive its result (or to take the
 * key over, if the process that held it died and its lock ran out).
 */
export class IdempotencyConflictError extends IdempotencyRunError {
  constructor(details: IdempotencyRunErrorDetails, retryAfterMs: number) {
    super(
      'request-in-progress',
      details,
      'another call with this key is still running.',
      retryAfterMs,
    );
  }
}

/**
 * The key was used before with another payload: it stands for another operation. Use a new key
 * for a new operation. Never retryable.
 */
export class IdempotencyPayloadMismatchError extends IdempotencyRunError {
  constructor(details: IdempotencyRunErrorDetails) {
    super(
      'key-reused',
      details,
      'this key was already used with a different payload; use a new key for a new operation.',
      undefined,
    );
  }
}

/**
 * The store did not answer (or failed) when the key was checked, or the transaction of a
 * transactional call lost its connection: the work did not run, or nothing of it was committed.
 * Retry after `retryAfterMs`. The store's error is the `cause`.
 */
export class IdempotencyStoreUnavailableError extends IdempotencyRunError {
  constructor(
    details: IdempotencyRunErrorDetails,
    what = 'the store could not check the key, so the work did not run.',
  ) {
    super('store-unavailable', details, what, 1000);
  }
}

/**
 * A transactional call's claim was taken over while its work ran (it ran longer than `lockTimeout`
 * without renewal): its transaction was rolled back, nothing was committed. Retry to receive the
 * result of the call that took it over.
 */
export class IdempotencyLeaseLostError extends IdempotencyRunError {
  constructor(details: IdempotencyRunErrorDetails) {
    super(
      'lease-lost',
      details,
      'another call took the key over while this one ran; its transaction was rolled back.',
      1000,
    );
  }
}

/**
 * A transactional call returned a value that cannot be stored (not serialisable as JSON, over
 * `maxResponseBytes`, or refused by `storeStatuses`): its transaction was rolled back and the key
 * released. Not retryable as it is: the same work would return the same value.
 */
export class IdempotencyResultNotStoredError extends IdempotencyRunError {
  constructor(details: IdempotencyRunErrorDetails) {
    super(
      'result-not-stored',
      details,
      'the work returned a value that cannot be stored, so its transaction was rolled back.',
      undefined,
    );
  }
}

/**
 * The key completed, but its stored result cannot be opened (encryption keys not configured,
 * tampering): the work is not run again and no result is returned.
 */
export class IdempotencyResultUnreadableError extends IdempotencyRunError {
  constructor(details: IdempotencyRunErrorDetails) {
    super(
      'response-unreadable',
      details,
      'the key completed, but its stored result cannot be read (encryption keys?); the work was not run again.',
      undefined,
    );
  }
}

/**
 * The call's key, scope or payload cannot be used: the key is not 1–255 printable ASCII
 * characters (or an integer), the scope is no identity (a string, a number or a bigint), the
 * payload cannot be fingerprinted (a cycle, a BigInt, nested too deep). A mistake in the caller:
 * never retryable.
 */
export class IdempotencyInvalidCallError extends IdempotencyRunError {
  constructor(
    code: Extract<RejectionCode, 'key-invalid' | 'scope-invalid' | 'body-unreadable'>,
    details: IdempotencyRunErrorDetails,
    reason: string,
  ) {
    super(code, details, reason, undefined);
  }
}
