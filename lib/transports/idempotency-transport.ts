import type { ExecutionContext } from '@nestjs/common';
import type { Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import type { ConcurrencyMode, Outcome, SettledMessage } from '../core/types.js';
import type { ResolvedRouteOptions } from '../idempotency.options.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import type { FingerprintInput } from '../utils/fingerprint.js';
import type { KeyReading } from '../utils/idempotency-key.js';

/** What a transport tells the state machine about one call. */
export interface OperationDescription {
  /**
   * The record's endpoint (with the scope and the key, its identity): the route pattern, the
   * mutation field and its path, or the message handler. At most 255 characters.
   */
  readonly endpoint: string;
  /** What the route's `scope` resolver receives (see `ScopeResolver`). */
  readonly scopeSource: unknown;
  /** What makes two calls with one key "the same request". */
  readonly fingerprint: FingerprintInput;
}

/**
 * One adapter per transport (HTTP, GraphQL, RPC): everything the interceptor needs that depends
 * on how the call arrived. The interceptor drives the same plan for all of them — read the key,
 * decide, then run and store, replay, or reject — and never branches on the transport itself.
 */
export interface IdempotencyTransport {
  /** `ExecutionContext.getType()` of the calls this adapter serves. */
  readonly type: string;
  /** How a duplicate in flight is treated when neither the route nor the module sets `concurrency`. */
  readonly defaultConcurrency: ConcurrencyMode;
  /** Whether `@Idempotent()` applies to this call (GraphQL: mutations only); others run as they are. */
  applies(context: ExecutionContext): boolean;
  /** The call's Idempotency-Key: where this transport carries it. */
  readKey(context: ExecutionContext): KeyReading;
  /**
   * The operation: its endpoint, what the scope resolver sees, what is fingerprinted. A promise
   * when the payload must be read first (HTTP: an upload's files, a body not parsed yet).
   */
  describe(context: ExecutionContext): OperationDescription | Promise<OperationDescription>;
  /**
   * The response to store for the handler's outcome, or `null` when it is not stored (the key is
   * then released): a crash, a status the policy does not keep, too large, a stream. Never throws
   * (nor rejects: a promise when the value must be read first, as GraphQL's lazy fields).
   */
  capture(
    context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null | Promise<StoredResponse | null>;
  /** Answers with a stored response, as the first call was answered. */
  replay(
    context: ExecutionContext,
    stored: StoredResponse,
    options: ResolvedRouteOptions,
  ): Observable<unknown>;
  /** The transport's native error for a rejection (thrown by the interceptor). */
  reject(context: ExecutionContext, rejection: IdempotencyRejection): Error;
  /** How the call ended, once it is settled (RPC: acknowledge the message, see `acknowledge`). */
  settled?(context: ExecutionContext, settled: SettledMessage, options: ResolvedRouteOptions): void;
  /** With `settled`: how a call whose handler threw ends when its outcome is not stored. */
  settledAfterError?(error: unknown, options: ResolvedRouteOptions): SettledMessage;
  /**
   * The result to capture from what the handler emitted, where the caller receives more than its
   * last value (RPC: Nest sends every value of an Observable); by default the last value, as Nest
   * answers HTTP and GraphQL calls.
   */
  result?(emitted: Observable<unknown>): Promise<unknown>;
  /** With `result`: what the first caller receives for it. */
  answer?(result: unknown): Observable<unknown>;
}
