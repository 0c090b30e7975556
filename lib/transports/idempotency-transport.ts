import type { ExecutionContext } from '@nestjs/common';
import type { Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import type { ConcurrencyMode, Outcome, SettledMessage } from '../core/types.js';
import type { ResolvedRouteOptions } from '../idempotency.options.js';
import type { KeyFunction, KeySource } from '../interfaces/idempotency-options.interface.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import type { FingerprintInput } from '../utils/fingerprint.js';
import { readKeyValue, valueAtPath, type KeyReading } from '../utils/idempotency-key.js';

/** What a transport tells the state machine about one call. */
export interface OperationDescription {
  /**
   * The record's endpoint (with the scope and the key, its identity): the route pattern, the
   * mutation field and its path, or the message handler. At most 255 characters.
   */
  readonly endpoint: string;
  /** What the route's `scope` resolver receives (see `ScopeResolver`). */
  readonly scopeSource: unknown;
  /**
   * What makes two calls with one key "the same request", by default; only when `describe` is
   * asked for it (a route with a `fingerprint` option of its own needs none).
   */
  readonly fingerprint?: FingerprintInput;
  /** What a `fingerprint` function receives: the HTTP body, the field's arguments, the payload. */
  readonly payload: unknown;
}

/** A route's compiled way of reading its calls' keys (see `keyFrom`); a promise for an async function. */
export type KeyReader = (context: ExecutionContext) => KeyReading | Promise<KeyReading>;

/** A `keyFrom` function's reader: its result (awaited, when a promise) read as a key value. */
export function functionKeyReader(source: KeyFunction): KeyReader {
  return (context) => {
    const value = source(context);
    return value instanceof Promise
      ? value.then((resolved) => readKeyValue(resolved, 'from keyFrom'))
      : readKeyValue(value, 'from keyFrom');
  };
}

/** A `keyFrom` dot path's reader, into what `root` gives (the body, the arguments, the payload). */
export function pathKeyReader(
  path: string,
  what: string,
  root: (context: ExecutionContext) => unknown,
): KeyReader {
  const segments = path.split('.');
  const where = `${what} ${path}`;
  return (context) => readKeyValue(valueAtPath(root(context), segments), where);
}

/** The kind and the text of a `keyFrom` source that is not a function. */
export function sourceParts(
  source: Exclude<KeySource, KeyFunction>,
): readonly [kind: 'header' | 'body' | 'arg' | 'payload', text: string] {
  const [kind] = Object.keys(source) as ('header' | 'body' | 'arg' | 'payload')[];
  return [kind, (source as Record<string, string>)[kind]];
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
  /**
   * How a route reads its calls' keys, compiled once per route: from `source` (`keyFrom`), or
   * where this transport carries the Idempotency-Key by default. A source this transport has not
   * (`{ body }` on a message) reads no key.
   */
  keyReader(source: KeySource | undefined): KeyReader;
  /**
   * The operation: its endpoint, what the scope resolver sees, what is fingerprinted (with
   * `fingerprinted`: the default fingerprint's input). A promise when the payload must be read
   * first (HTTP: an upload's files, a body not parsed yet).
   */
  describe(
    context: ExecutionContext,
    fingerprinted: boolean,
  ): OperationDescription | Promise<OperationDescription>;
  /**
   * Called once the key is claimed, just before the handler runs: what must be noted of the call
   * before the handler (HTTP: the response's headers and status, so only those it sets are stored).
   */
  prepare?(context: ExecutionContext): void;
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
