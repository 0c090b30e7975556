import type { EntityManager } from 'typeorm';

/** Identifies one record: a key is unique per caller scope and per endpoint. */
export interface RecordId {
  /** The caller's identity from the scope resolver ('' when keys are not per caller). */
  readonly scope: string;
  /** The route the key belongs to, e.g. `POST /payments/:id/refunds`. */
  readonly endpoint: string;
  /** The client's Idempotency-Key. */
  readonly key: string;
}

/**
 * One string per record id, unambiguous (each part but the last is length-prefixed): the key of
 * in-process maps of records (the replay cache, the batches of a statement).
 */
export function recordName({ scope, endpoint, key }: RecordId): string {
  return `${scope.length}:${scope}${endpoint.length}:${endpoint}${key}`;
}

/** How a stored body is serialised. */
export type BodyEncoding = 'json' | 'base64' | 'sealed';

/** A response as stored: everything needed to send it again. */
export interface StoredResponse {
  /** The status code (HTTP), or the status the answer stands for on other transports. */
  readonly status: number;
  /** The headers a replay sends (HTTP: see `replayHeaders`); `{}` when sealed (they are inside). */
  readonly headers: Readonly<Record<string, string | string[]>>;
  /** The body in serialised form (see `encodeBody`); `null` for no body. */
  readonly body: string | null;
  /** `sealed`: encrypted (`encryption` option); the body is the envelope and the headers are in it. */
  readonly bodyEncoding: BodyEncoding;
  /** The handler threw an HttpException: the replay throws it again, through the same filters. */
  readonly isError: boolean;
}

export type RecordState = 'in_progress' | 'completed';

/** A record as the store read it. */
export interface RecordSnapshot {
  /** `in_progress`: claimed, its handler running (or its process gone); `completed`: stored. */
  readonly state: RecordState;
  /** The fingerprint of the payload the key is bound to (SHA-256, hex). */
  readonly fingerprint: string;
  /**
   * The lease token of the claim that holds the record (in progress) or completed it: a completed
   * record keeps it, since an encrypted response is bound to it (one token per lifetime of a key).
   */
  readonly token: string;
  /** Until then an in-progress record is locked, and a completed one replays. */
  readonly expiresAt: number;
  /** The stored response of a completed record; `null` while in progress. */
  readonly response: StoredResponse | null;
}

/** A claim on a record: completing or releasing it is conditional on still holding the token. */
export interface Lease {
  /** The record claimed. */
  readonly id: RecordId;
  /** The claim's random token (`ClaimRequest.token`), stored in the record while it holds it. */
  readonly token: string;
  /**
   * Duplicates may be waiting on this record (its route is in `'wait'` mode): a store that
   * supports `watch` wakes them when it completes or releases the record. Unset: nobody waits,
   * so no wake-up is sent.
   */
  readonly watched?: boolean;
  /**
   * The fingerprint of the payload the claim was made for. The module sets it on the leases it
   * hands out (an encrypted response is bound to it); a store need not.
   */
  readonly fingerprint?: string;
}

/** Where a lease stands in the store (see `IdempotencyStore.leaseState`). */
export type LeaseState =
  /** The record is in progress under this lease. */
  | 'held'
  /** The record was completed under this lease. */
  | 'completed'
  /** There is no record: released (or expired and purged). */
  | 'absent'
  /** The record belongs to another lease: taken over. */
  | 'taken';

/** What `IdempotencyStore.claim` is asked to claim, and for how long. */
export interface ClaimRequest {
  /** The record to claim. */
  readonly id: RecordId;
  /**
   * The fingerprint of the request's payload: stored with a new record; an in-progress record
   * past its lock is taken over only with the same fingerprint.
   */
  readonly fingerprint: string;
  /** A fresh random token that identifies this claim. */
  readonly token: string;
  /** The current time, epoch ms. */
  readonly now: number;
  /** Until when the claim locks the key, epoch ms. */
  readonly lockedUntil: number;
  /**
   * Optional hint: how long the response will be kept once completed (the route's `ttl`), ms. The
   * TypeORM store indexes the record for its purge from `min(now + ttlMs, lockedUntil)` on, already
   * at the claim (no completion can expire earlier, and an abandoned claim is purged from its lock's
   * end, as before), so that the completion changes no indexed column. Without it,
   * from `now` on: the purge then finds each record once before it expires and moves it up to its
   * `expires_at` (one more update per record, in the purge's batches).
   * @default undefined
   */
  readonly ttlMs?: number;
}

/**
 * From when on the purge looks at a claimed record (see `ClaimRequest.ttlMs`): no later than its
 * completion could expire. An abandoned claim's record, which may be taken over from the end of
 * its lock, is purged once that time has passed too.
 */
export function purgeFrom({ now, ttlMs, lockedUntil }: ClaimRequest): number {
  // An abandoned claim expires at its lock's end: the purge looks at it from then on at the latest.
  return ttlMs === undefined ? now : Math.min(now + ttlMs, lockedUntil);
}

/** What `IdempotencyStore.claim` found: the claim won, or the record that holds the key. */
export type ClaimResult =
  /** `takeover`: the key existed but had expired (TTL over, or an abandoned lock). */
  | {
      /** `true`: the key is now held by this claim. */
      readonly claimed: true;
      /** The claim won, with the request's token. */
      readonly lease: Lease;
      /** The claim replaced an expired record rather than inserting a new one. */
      readonly takeover: boolean;
    }
  | {
      /** `false`: another claim holds the key, or completed it, and it has not expired. */
      readonly claimed: false;
      /** The record as it is. */
      readonly record: RecordSnapshot;
    };

/**
 * Where records live. An implementation must decide races in the storage itself: of concurrent
 * `claim` calls for one id, exactly one may win, across processes.
 */
export interface IdempotencyStore extends IdempotencyAdminStore {
  /**
   * Atomically claims the id — inserting a new record, or taking over one that has expired
   * (a completed record past its TTL, or an in-progress one past its lock with the same
   * fingerprint) — or, when it is held, returns the record as it is.
   */
  claim(request: ClaimRequest): Promise<ClaimResult>;
  /** Stores the response, if the lease is still held; `false` when it was lost to a takeover. */
  complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean>;
  /** Deletes the record, if the lease is still held, so the key can be used again. */
  release(lease: Lease): Promise<boolean>;
  /**
   * Extends the lock of a lease that is still held (an in-progress record with this token) to
   * `lockedUntil`, epoch ms, never moving it back (a renewal delayed in transit may land after a
   * later one; it still counts as held); `false` when the lease was lost (taken over, completed or
   * released).
   */
  renew(lease: Lease, lockedUntil: number): Promise<boolean>;
  /**
   * Optional: reads where the lease stands. Asked only when a `complete` or `release` was tried
   * again after an attempt whose answer never came (a timeout, a connection lost after the
   * statement committed) and the retry changed nothing: a record completed under this lease (for
   * `complete`), or gone (for `release`), means the earlier attempt did it. Without it, such a
   * retry is logged and counted as a lost lease.
   */
  leaseState?(lease: Lease): Promise<LeaseState>;
  /**
   * Optional, for the transactional mode: runs `work` in one transaction of the store's database.
   * `work` runs the handler's writes through `transaction.manager` and ends with
   * `transaction.complete(...)`; the transaction commits when `work` resolves and rolls back when
   * it rejects. A store without it cannot serve routes with `transactional: true` (refused at
   * startup).
   */
  transaction?<T>(work: (transaction: StoreTransaction) => Promise<T>): Promise<T>;
  /**
   * Optional: why this store cannot run the transactional mode (e.g. a driver that shares one
   * session among all requests), or `undefined` when it can. Asked once at startup.
   */
  transactionsUnsupported?(): string | undefined;
  /** Deletes up to `limit` records that expired before `now`; returns how many it deleted. */
  purgeExpired(now: number, limit: number): Promise<number>;
  /**
   * Optional: watches a record for the completion or release of a watched lease, so a waiting
   * duplicate is woken instead of re-reading the record on a timer. `undefined` (or no method):
   * the store cannot push changes, and waiters poll every `waitPollInterval`.
   */
  watch?(id: RecordId): RecordWatch | undefined;
}

/** A record as an operator sees it (see `IdempotencyStore.findRecords`). */
export interface RecordDetails extends RecordSnapshot {
  /** Which record it is. */
  readonly id: RecordId;
  /**
   * When the claim that holds (or completed) the record was made, epoch ms; `null` when the store
   * does not know (a Redis record written by a version before the admin tools).
   */
  readonly createdAt: number | null;
}

/** Which records `IdempotencyStore.findRecords` returns: every given field must match. */
export interface RecordQuery {
  /** The client's Idempotency-Key, under any scope and endpoint unless those are given too. */
  readonly key?: string;
  /** Only records of this caller scope. @default any scope */
  readonly scope?: string;
  /** Only records of this endpoint, e.g. `POST /orders`. @default any endpoint */
  readonly endpoint?: string;
  /** Only records in this state. @default both */
  readonly state?: RecordState;
  /** Only records claimed before this time, epoch ms (a Redis record of unknown age matches). */
  readonly createdBefore?: number;
  /** At most this many records, oldest claim first. */
  readonly limit: number;
}

/**
 * Which records an invalidation concerns: one record (`matches`), or every record (`all`). With
 * `listening: false`, the store has stopped listening (its connection was lost): deletions are not
 * told until the next `all` invalidation without it, which comes when it listens again.
 */
export type RecordInvalidation =
  | {
      /** `false`: one record was deleted. */
      readonly all: false;
      /** Whether `id` is the deleted record's. */
      readonly matches: (id: RecordId) => boolean;
    }
  | {
      /** `true`: any record may have been deleted; drop every one. */
      readonly all: true;
      /** `false`: the store stopped listening, and tells nothing until its next `all`. @default true */
      readonly listening?: boolean;
    };

/**
 * The operator's part of a store (see `IdempotencyAdmin`): optional methods, each store that has
 * them supports `inspect`, `list`, `release` and `forget`.
 */
export interface IdempotencyAdminStore {
  /** The records that match `query`, with their responses. */
  findRecords?(query: RecordQuery): Promise<RecordDetails[]>;
  /**
   * Deletes the record of `id` if it still is as the operator saw it (same state, same lease
   * token): a live handler's completion under that token then matches nothing and is refused.
   * Tells every process that listens (`onInvalidated`) to drop the record from its replay cache,
   * and wakes the duplicates waiting on it. `false`: the record changed or is gone.
   */
  deleteRecord?(
    id: RecordId,
    seen: { readonly state: RecordState; readonly token: string },
  ): Promise<boolean>;
  /**
   * Calls `listener` when a record was deleted by `deleteRecord`, in this process or any other
   * (PostgreSQL through `pg`: LISTEN/NOTIFY; Redis: pub/sub); with `all` when the store cannot
   * tell what it missed: each time its listening connection starts listening ((re)connected),
   * and once for a listener added while it already listens (it heard nothing before). That one
   * comes after this call returns (a microtask later at the soonest, so the caller's setup is
   * done), and not if the listener was stopped meanwhile: every listener hears an `all` once the
   * store listens for it, which is how it knows it is told from then on. With `all` and
   * `listening: false` when that connection is lost (nothing is told until the next `all`).
   * Returns how to stop.
   * Unsupported (no method, or `undefined`): other processes are not told.
   */
  onInvalidated?(listener: (invalidation: RecordInvalidation) => void): (() => void) | undefined;
}

/** One transaction of the transactional mode (see `IdempotencyStore.transaction`). */
export interface StoreTransaction {
  /** The transaction's EntityManager: every write of the handler goes through it. */
  readonly manager: EntityManager;
  /**
   * Stores the response inside the transaction, if the lease is still held: as `complete`, but it
   * becomes visible only when the transaction commits, together with the handler's writes.
   */
  complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean>;
}

/**
 * A waiting duplicate's subscription to changes of one record (see `IdempotencyStore.watch`).
 * Wake-ups are hints, never proof: the waiter re-reads the record after each.
 */
export interface RecordWatch {
  /**
   * Whether changes are being pushed right now. While it is false (the store's listening
   * connection is down, or not up yet) the waiter polls as if there were no watch.
   */
  readonly live: boolean;
  /**
   * Resolves after `timeoutMs` at the latest; at once if the record changed since the watch began
   * or since the previous call returned, or as soon as it changes, or when `live` flips.
   */
  changed(timeoutMs: number): Promise<void>;
  /** Ends the subscription. */
  close(): void;
}

/** DI token of the store; same name as the interface, as in @nestjs/throttler. */
export const IdempotencyStore = Symbol('IdempotencyStore');
