/**
 * Types that several rooms share (core, transports, interceptors, options, storage users): they
 * live here, below all of them, so no room imports a room above it for a type. Imports nothing but
 * the storage interface and leaves.
 */
import type { EntityManager } from 'typeorm';
import type { ReplayCache } from '../replay-cache.js';
import type { ResponseSealer } from '../security/response-sealer.js';
import type { Lease, RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';

/** What a duplicate does while the first request with its key is still running. */
export type ConcurrencyMode = 'reject' | 'wait';

/** How a handler ended: the value it returned, or what it threw. */
export type Outcome =
  | {
      /** `true`: the handler returned (or its promise or observable resolved). */
      readonly ok: true;
      /** What the handler returned. */
      readonly value: unknown;
    }
  | {
      /** `false`: the handler threw (or its promise or observable rejected). */
      readonly ok: false;
      /** What the handler threw. */
      readonly error: unknown;
    };

/**
 * How a message ended, as told to `acknowledge`, once for every message that reaches
 * `@Idempotent()`: `done` (the handler returned, or gave its final answer: a stored result, an
 * RpcException without a `statusCode`; or it was a duplicate of a completed message), `retry` (not
 * done, and it may succeed later: in progress elsewhere, the store unreachable, its claim lost, the
 * handler crashed or failed with a 5xx, 408 or 429), or `drop` (delivering it again cannot help:
 * another payload under its key, an invalid or missing key, a released 4xx other than 408 and 429
 * such as a 400 from the ValidationPipe, a refusal by the `scope` resolver).
 */
export type SettledMessage =
  | {
      /** `done`: acknowledge the message; delivering it again would change nothing. */
      readonly kind: 'done';
      /**
       * `true`: the handler did not run for this delivery, its stored result answered it (a
       * duplicate of a completed message; with several handlers, only when every one of them
       * replayed). `false`: a handler ran.
       */
      readonly replayed: boolean;
    }
  | {
      /** `retry`: not done; have the broker deliver the message again (nack with requeue, …). */
      readonly kind: 'retry';
      /**
       * Why, for logs: the rejection's code (e.g. `request-in-progress`, `store-unavailable`), or
       * a short sentence such as `the handler failed (503)`.
       */
      readonly reason: string;
    }
  | {
      /** `drop`: reject the message without requeueing it (or send it to a dead-letter queue). */
      readonly kind: 'drop';
      /**
       * Why, for logs: the rejection's code (e.g. `key-reused`), or a short sentence such as
       * `the handler refused the message (400)`.
       */
      readonly reason: string;
    };

/**
 * Settles a message with its broker, once `@Idempotent()` knows how it ended (see
 * `SettledMessage`): with manual acknowledgement, let the module acknowledge instead of the
 * handler, since the handler's own `ack` would come before the result is committed (a crash in
 * between would lose the message) and never comes for a duplicate the module answers itself.
 * Called once per message, also when several handlers of its event acknowledge (then once the last
 * of them has settled it).
 */
export type MessageAcknowledgement = (context: unknown, settled: SettledMessage) => void;

/** What to do with a request, decided by its key's record. */
export type Decision =
  /** The key is ours: run the handler, then `complete` or `release` the lease. */
  | {
      /** `execute`: this request claimed the key (a new record, or a takeover). */
      readonly action: 'execute';
      /** The claim this request now holds: settling the key is conditional on it. */
      readonly lease: Lease;
    }
  /** The key completed with this payload: send the stored response. */
  | {
      /** `replay`: answer with the stored response; the handler does not run. */
      readonly action: 'replay';
      /** The response stored by the first request with the key (opened, if it was sealed). */
      readonly response: StoredResponse;
    }
  /** The key belongs to another payload. */
  | {
      /** `mismatch`: refuse the request (HTTP: 422 problem `key-reused`). */
      readonly action: 'mismatch';
    }
  /** The first request with the key is still running (and the wait, if any, ran out). */
  | {
      /** `in-progress`: refuse the request for now (HTTP: 409 problem `request-in-progress`). */
      readonly action: 'in-progress';
      /** Until the running claim's lock ends, ms from now (0 when it has ended already). */
      readonly retryAfterMs: number;
    }
  /**
   * The key completed with this payload, but its stored response cannot be opened (encryption
   * keys, tampering): the request fails closed, and the handler does not run again.
   */
  | {
      /** `unreadable`: fail the request without running the handler. */
      readonly action: 'unreadable';
    };

/** What `begin` needs to claim a key or read its record. */
export interface BeginRequest {
  readonly id: RecordId;
  readonly fingerprint: string;
  readonly lockTimeoutMs: number;
  readonly concurrency: ConcurrencyMode;
  readonly waitTimeoutMs: number;
  /** The route's TTL: the store may index the record for its purge from `now + ttlMs` already at the claim (see `ClaimRequest.ttlMs`). */
  readonly ttlMs?: number;
}

/**
 * The transport's part of settling a key: the response to store for an outcome, or `null` when the
 * outcome is not stored and the key must be released (a crash, a status the policy does not keep,
 * a response too large or a stream). Must not throw.
 */
export type CaptureOutcome = (
  outcome: Outcome,
) => StoredResponse | null | Promise<StoredResponse | null>;

/** What `execute` needs of the route's options. */
export interface ExecuteOptions {
  /** How long the stored response is kept, ms from its completion (the route's `ttl`). */
  readonly ttlMs: number;
  /**
   * How long the claim holds the key without a renewal, ms (the route's `lockTimeout`): each
   * renewal, every third of it, extends the lock to `now + lockTimeoutMs`.
   */
  readonly lockTimeoutMs: number;
  /** 0: the claim is not renewed. */
  readonly lockRenewalLimitMs: number;
  /**
   * The handler runs in a transaction of the store, which stores its response as the last
   * statement (the route's `transactional`).
   */
  readonly transactional: boolean;
}

/** The idempotent operation a handler is running for: what `IdempotencyContext` tells it. */
export interface IdempotentOperation extends RecordId {
  /** The fingerprint of the payload the key is bound to. */
  readonly fingerprint: string;
  /** The transaction of a transactional route; `undefined` on other routes. */
  readonly entityManager: EntityManager | undefined;
}

/**
 * Runs a handler as its operation, so the handler's code sees it (`IdempotencyContext`): given to
 * the core by the layer that owns the context, the core knows nothing of how it is kept.
 */
export type RunAsOperation = <T>(
  operation: IdempotentOperation,
  work: () => Promise<T>,
) => Promise<T>;

/** The module-wide settings the core runs with (from the resolved module options). */
export interface CoreSettings {
  /** How often a waiting duplicate re-reads a record it cannot watch. */
  readonly waitPollIntervalMs: number;
  /** How long a store call may take before the request is answered as the store being unavailable. */
  readonly storeTimeoutMs: number;
  /** Seals and opens stored responses, when `encryption` is set. */
  readonly sealer: ResponseSealer | undefined;
  /** Completed records read in this process, unless `replayCache: false`. */
  readonly replayCache: ReplayCache | undefined;
}
