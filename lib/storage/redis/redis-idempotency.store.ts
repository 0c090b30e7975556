import { hash } from 'node:crypto';
import type {
  BodyEncoding,
  ClaimRequest,
  ClaimResult,
  IdempotencyStore,
  Lease,
  LeaseState,
  RecordDetails,
  RecordId,
  RecordInvalidation,
  RecordQuery,
  RecordState,
  RecordWatch,
  StoredResponse,
} from '../idempotency-store.interface.js';
import { RecordWatches } from '../record-watches.js';
import { quietLogger } from '../../utils/quiet-logger.js';

/**
 * What the store needs of an ioredis 5 client (`Redis` or `Cluster`); typed here so the package
 * does not depend on ioredis.
 */
export interface RedisClient {
  /** Defines a Lua script as a command of the client (ioredis's `defineCommand`). */
  defineCommand(name: string, definition: { numberOfKeys: number; lua: string }): unknown;
  /** A new connection with the same options: the store's subscriber. */
  duplicate(): RedisSubscriber;
}

/** What the store needs of its subscriber connection. */
export interface RedisSubscriber {
  /** ioredis's connection status: `'wait'` for a `lazyConnect` client not connected yet. */
  readonly status?: string;
  /** Connects a `lazyConnect` connection (ioredis's `connect`). */
  connect?(): Promise<unknown>;
  /** A message published on a channel the connection subscribed to. */
  on(event: 'message', listener: (channel: string, message: string) => void): unknown;
  /** The connection is ready (after each reconnect too), or closed. */
  on(event: 'ready' | 'close', listener: () => void): unknown;
  /** A connection error (ioredis reconnects by itself). */
  on(event: 'error', listener: (error: Error) => void): unknown;
  /** Subscribes to `channel` (SUBSCRIBE). */
  subscribe(channel: string): Promise<unknown>;
  /** Closes the connection gracefully (QUIT). */
  quit(): Promise<unknown>;
  /** Closes the connection at once, when `quit` failed. */
  disconnect(): void;
}

/** Options of the Redis store. */
export interface RedisIdempotencyStoreOptions {
  /**
   * Prefix of every Redis key of the store (one hash per record) and of its change channel.
   * @default 'idempotency:'
   */
  readonly prefix?: string;
  /**
   * How long past its end (TTL or lock) Redis keeps a record before expiring it, in ms. Ends are
   * decided by the app's clock, as on the SQL stores; Redis's own expiry only collects garbage, so
   * this margin must exceed the clock skew between the app's hosts and Redis.
   * @default 60000
   */
  readonly expiryGraceMs?: number;
  /**
   * Wake waiting duplicates through Redis pub/sub (one extra connection per store, opened on the
   * first wait) instead of polling.
   * @default true
   */
  readonly waitNotifications?: boolean;
}

/**
 * Hash fields: s state, f fingerprint, t lease token (kept once completed: an encrypted response is
 * bound to it), x expires at (ms), a claimed at (ms; absent on records of earlier versions), and
 * the response:
 * c status, h headers (JSON), b body (absent: no body), e body encoding, r is error ('1'/'0').
 * Every script reads the record and writes it in one step (scripts run atomically).
 */
const CLAIM = `
local r = redis.call('HMGET', KEYS[1], 's', 'f', 'x', 'c', 'h', 'b', 'e', 'r', 't')
local takeover = 0
-- This claim's own token: an earlier attempt of it landed (its answer was lost).
if r[1] == 'in_progress' and r[9] == ARGV[2] then return {1, 0} end
if r[1] then
  local dead = tonumber(r[3]) <= tonumber(ARGV[3]) and (r[1] == 'completed' or r[2] == ARGV[1])
  if not dead then return {0, r[1], r[2], r[3], r[4] or '', r[5] or '', r[6] or '', r[7] or '', r[8] or '', r[6] and '1' or '0', r[9] or ''} end
  takeover = 1
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 's', 'in_progress', 'f', ARGV[1], 't', ARGV[2], 'x', ARGV[4], 'a', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[5]))
return {1, takeover}`;

/** Where a lease stands: absent, taken (another token), completed or held. */
const LEASE_STATE = `
local r = redis.call('HMGET', KEYS[1], 's', 't')
if not r[1] then return 'absent' end
if r[2] ~= ARGV[1] then return 'taken' end
if r[1] == 'completed' then return 'completed' end
return 'held'`;

const UNDER_LEASE = `
local held = redis.call('HMGET', KEYS[1], 's', 't', 'x')
if held[1] ~= 'in_progress' or held[2] ~= ARGV[1] then return 0 end`;

const NOTIFY = `
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end`;

/** ARGV: token, channel ('' for none), tag, expires at, grace, status, headers, is error, encoding, has body, body. */
const COMPLETE = `${UNDER_LEASE}
redis.call('HSET', KEYS[1], 's', 'completed', 'x', ARGV[4], 'c', ARGV[6], 'h', ARGV[7], 'r', ARGV[8], 'e', ARGV[9])
if ARGV[10] == '1' then redis.call('HSET', KEYS[1], 'b', ARGV[11]) end
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[5]))${NOTIFY}
return 1`;

/** ARGV: token, channel, tag. */
const RELEASE = `${UNDER_LEASE}
redis.call('DEL', KEYS[1])${NOTIFY}
return 1`;

/** ARGV: token, (unused), (unused), locked until, grace. Never moves a lock back. */
const RENEW = `${UNDER_LEASE}
local lockedUntil = math.max(tonumber(held[3]), tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'x', string.format('%.0f', lockedUntil))
redis.call('PEXPIREAT', KEYS[1], lockedUntil + tonumber(ARGV[5]))
return 1`;

/**
 * An operator's delete (`deleteRecord`): only if the record is as seen. ARGV: state, token,
 * channel, tag, invalidation.
 */
const DELETE_AS_SEEN = `
local r = redis.call('HMGET', KEYS[1], 's', 't')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[3], ARGV[5])
return 1`;

/**
 * A pub/sub payload of the store's channel that says an operator deleted the record of the tag
 * that follows (replay caches drop it). Earlier versions wake no watch with it.
 */
const INVALIDATION_PREFIX = 'forget:';

/** What the operator's methods need of the client beyond `RedisClient` (ioredis has them all). */
interface AdminCommands {
  scan(cursor: string, ...args: (string | number)[]): Promise<[string, string[]]>;
  hgetall(key: string): Promise<Record<string, string>>;
  /** A Cluster's nodes: each master is scanned. */
  nodes?(role: 'master'): AdminCommands[];
  idempotencyDeleteAsSeen?(key: string, ...args: string[]): Promise<number>;
}

interface Scripts {
  idempotencyClaim(key: string, ...args: (string | number)[]): Promise<(string | number | null)[]>;
  idempotencyComplete(key: string, ...args: (string | number)[]): Promise<number>;
  idempotencyRelease(key: string, ...args: (string | number)[]): Promise<number>;
  idempotencyRenew(key: string, ...args: (string | number)[]): Promise<number>;
  idempotencyLeaseState(key: string, token: string): Promise<LeaseState>;
}

/**
 * Records in Redis (ioredis): one hash per record, claim, completion, renewal and release as Lua
 * scripts fenced by the lease token, records expired by Redis, waiting duplicates woken through
 * pub/sub. Give it a client of your own (`new Redis(url)`, or a `Cluster`: each script touches one
 * key); call `close()` when done (the module does not own the client, and closes only the store's
 * own subscriber connection).
 *
 * Durability is Redis's: with `appendonly yes` and `appendfsync everysec` a crash of Redis can lose
 * the last second of claims and completions, and a retry of a lost completion runs its handler
 * again; `maxmemory-policy` must be `noeviction` (an evicted record is a forgotten key). There is
 * no transactional mode: the handler's writes live elsewhere.
 */
export class RedisIdempotencyStore implements IdempotencyStore {
  private readonly logger = quietLogger('Idempotency');
  private readonly prefix: string;
  private readonly graceMs: number;
  private readonly channel: string;
  private readonly redis: RedisClient & Scripts;
  private subscriber: RedisSubscriber | null = null;
  private subscribed = false;
  private readonly watches = new RecordWatches(() => this.subscribed);
  private readonly notifications: boolean;
  /**
   * Called with the tag of each record an operator deleted, or `null`: anything may have been
   * (`listening` false: the subscriber was lost, nothing is heard until it is back).
   */
  private readonly invalidationListeners = new Set<
    (tag: string | null, listening: boolean) => void
  >();

  constructor(redis: RedisClient, options: RedisIdempotencyStoreOptions = {}) {
    this.prefix = options.prefix ?? 'idempotency:';
    this.graceMs = options.expiryGraceMs ?? 60_000;
    this.channel = `${this.prefix}changes`;
    this.notifications = options.waitNotifications ?? true;
    this.redis = redis as RedisClient & Scripts;
    if (!this.redis.idempotencyClaim) {
      redis.defineCommand('idempotencyClaim', { numberOfKeys: 1, lua: CLAIM });
      redis.defineCommand('idempotencyComplete', { numberOfKeys: 1, lua: COMPLETE });
      redis.defineCommand('idempotencyRelease', { numberOfKeys: 1, lua: RELEASE });
      redis.defineCommand('idempotencyRenew', { numberOfKeys: 1, lua: RENEW });
    }
    if (!this.redis.idempotencyLeaseState)
      redis.defineCommand('idempotencyLeaseState', { numberOfKeys: 1, lua: LEASE_STATE });
  }

  async claim({ id, fingerprint, token, now, lockedUntil }: ClaimRequest): Promise<ClaimResult> {
    const reply = await this.redis.idempotencyClaim(
      this.keyOf(id),
      fingerprint,
      token,
      now,
      lockedUntil,
      this.graceMs,
    );
    if (reply[0] === 1) return { claimed: true, lease: { id, token }, takeover: reply[1] === 1 };
    const [
      ,
      state,
      recordFingerprint,
      expiresAt,
      status,
      headers,
      body,
      encoding,
      isError,
      hasBody,
      recordToken,
    ] = reply as string[];
    return {
      claimed: false,
      record: {
        state: state as RecordState,
        fingerprint: recordFingerprint,
        token: recordToken,
        expiresAt: Number(expiresAt),
        response:
          state === 'completed'
            ? {
                status: Number(status),
                headers: headers ? (JSON.parse(headers) as StoredResponse['headers']) : {},
                body: hasBody === '1' ? body : null,
                bodyEncoding: (encoding || 'json') as BodyEncoding,
                isError: isError === '1',
              }
            : null,
      },
    };
  }

  async complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
    const reply = await this.redis.idempotencyComplete(
      this.keyOf(lease.id),
      ...this.leaseArguments(lease),
      expiresAt,
      this.graceMs,
      response.status,
      JSON.stringify(response.headers),
      response.isError ? '1' : '0',
      response.bodyEncoding,
      response.body === null ? '0' : '1',
      response.body ?? '',
    );
    return reply === 1;
  }

  async release(lease: Lease): Promise<boolean> {
    return (
      (await this.redis.idempotencyRelease(this.keyOf(lease.id), ...this.leaseArguments(lease))) ===
      1
    );
  }

  leaseState(lease: Lease): Promise<LeaseState> {
    return this.redis.idempotencyLeaseState(this.keyOf(lease.id), lease.token);
  }

  async renew(lease: Lease, lockedUntil: number): Promise<boolean> {
    return (
      (await this.redis.idempotencyRenew(
        this.keyOf(lease.id),
        lease.token,
        '',
        '',
        lockedUntil,
        this.graceMs,
      )) === 1
    );
  }

  /** Redis expires records by itself (`expiryGraceMs` after their end): nothing to purge. */
  purgeExpired(): Promise<number> {
    return Promise.resolve(0);
  }

  watch(id: RecordId): RecordWatch | undefined {
    if (!this.notifications) return undefined;
    const watch = this.watches.watch(this.tagOf(id));
    if (!this.subscriber) this.subscribe();
    return watch;
  }

  /** Nest calls it at app shutdown: the store's own subscriber must not keep the process alive. */
  onApplicationShutdown(): Promise<void> {
    return this.close();
  }

  /** Closes the store's subscriber connection, if it opened one; the client given is left open. */
  async close(): Promise<void> {
    const subscriber = this.subscriber;
    this.subscriber = null;
    this.subscribed = false;
    if (subscriber) await subscriber.quit().catch(() => subscriber.disconnect());
  }

  /**
   * One subscriber connection per store (a duplicate of the client). ioredis reconnects it and
   * subscribes again by itself; while it is down, watches report `live: false` and waiters poll,
   * and each change of `live` wakes every watch.
   */
  private subscribe(): void {
    const subscriber = this.redis.duplicate();
    this.subscriber = subscriber;
    const setLive = (live: boolean) => {
      if (this.subscribed === live) return;
      this.subscribed = live;
      // What was deleted while nobody listened is unknown; once lost, nothing is heard.
      this.invalidated(null, live);
      this.watches.wakeAll();
    };
    subscriber.on('message', (channel: string, tag: string) => {
      if (channel !== this.channel) return;
      if (tag.startsWith(INVALIDATION_PREFIX))
        this.invalidated(tag.slice(INVALIDATION_PREFIX.length));
      else this.watches.wake(tag);
    });
    subscriber.on('ready', () => {
      // After a reconnect ioredis subscribes again right after `ready`: the reply is the sign.
      subscriber.subscribe(this.channel).then(
        () => setLive(this.subscriber === subscriber),
        () => undefined,
      );
    });
    subscriber.on('close', () => setLive(false));
    subscriber.on('error', (error: Error) =>
      this.logger.debug(`Redis subscriber: ${error.message}`),
    );
    // A duplicate of a `lazyConnect` client is lazy too: nothing would ever connect it (it
    // subscribes once ready), and waiters would poll for good. ioredis reconnects it from then on.
    if (subscriber.status === 'wait') subscriber.connect?.().catch(() => undefined);
  }

  /**
   * The records that match `query` (see `IdempotencyAdmin`): one HGETALL when scope, endpoint and
   * key are all given, otherwise a SCAN of the store's keys (of every master, on a Cluster) —
   * O(number of keys), for an operator's occasional look.
   */
  async findRecords(query: RecordQuery): Promise<RecordDetails[]> {
    const admin = this.redis as unknown as AdminCommands;
    const { scope, endpoint, key } = query;
    const names =
      scope !== undefined && endpoint !== undefined && key !== undefined
        ? [this.keyOf({ scope, endpoint, key })]
        : await this.scanKeys(admin, key);
    const found: RecordDetails[] = [];
    for (const name of names) {
      const id = this.idOf(name);
      if (!id || (scope !== undefined && id.scope !== scope)) continue;
      if (
        (endpoint !== undefined && id.endpoint !== endpoint) ||
        (key !== undefined && id.key !== key)
      )
        continue;
      const hash = await admin.hgetall(name);
      if (!hash.s) continue;
      const record = redisRecordDetails(id, hash);
      if (query.state !== undefined && record.state !== query.state) continue;
      if (
        query.createdBefore !== undefined &&
        record.createdAt !== null &&
        record.createdAt >= query.createdBefore
      )
        continue;
      found.push(record);
    }
    found.sort((a, b) => (a.createdAt ?? 0) - (b.createdAt ?? 0));
    return found.slice(0, query.limit);
  }

  /**
   * Deletes the record if it is still as seen, and publishes, in the same script, its change tag
   * (waiting duplicates re-read) and its invalidation (replay caches drop it).
   */
  async deleteRecord(
    id: RecordId,
    seen: { readonly state: RecordState; readonly token: string },
  ): Promise<boolean> {
    const admin = this.redis as unknown as AdminCommands & RedisClient;
    if (!admin.idempotencyDeleteAsSeen)
      admin.defineCommand('idempotencyDeleteAsSeen', { numberOfKeys: 1, lua: DELETE_AS_SEEN });
    const tag = this.tagOf(id);
    const deleted = await admin.idempotencyDeleteAsSeen!(
      this.keyOf(id),
      seen.state,
      seen.token,
      this.channel,
      tag,
      `${INVALIDATION_PREFIX}${tag}`,
    );
    return deleted === 1;
  }

  /**
   * The invalidations sent by `deleteRecord` in any process, on the store's subscriber connection
   * (opened now, even with `waitNotifications: false`). If it is already subscribed (a waiter
   * opened it), `listener` gets `{ all: true, listening: true }` at once (in a microtask, once the
   * caller's code has run): it heard nothing before.
   */
  onInvalidated(listener: (invalidation: RecordInvalidation) => void): () => void {
    const onTag = (tag: string | null, listening: boolean) =>
      listener(
        tag === null
          ? { all: true, listening }
          : { all: false, matches: (id) => this.tagOf(id) === tag },
      );
    this.invalidationListeners.add(onTag);
    if (!this.subscriber) this.subscribe();
    else if (this.subscribed) {
      queueMicrotask(() => {
        if (this.subscribed && this.invalidationListeners.has(onTag)) onTag(null, true);
      });
    }
    return () => this.invalidationListeners.delete(onTag);
  }

  private invalidated(tag: string | null, listening = true) {
    for (const listener of this.invalidationListeners) listener(tag, listening);
  }

  /** The store's record keys, narrowed to one Idempotency-Key when given. */
  private async scanKeys(admin: AdminCommands, key: string | undefined): Promise<string[]> {
    const pattern = `${globEscape(this.prefix)}\\[*${key === undefined ? '' : `,${globEscape(JSON.stringify(key))}\\]`}`;
    const nodes = typeof admin.nodes === 'function' ? admin.nodes('master') : [admin];
    const names = new Set<string>();
    for (const node of nodes) {
      let cursor = '0';
      do {
        const [next, batch] = await node.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
        batch.forEach((name) => names.add(name));
        cursor = next;
      } while (cursor !== '0');
    }
    return [...names];
  }

  /** The id of a record key of this store; `undefined` for another key under the prefix. */
  private idOf(name: string): RecordId | undefined {
    try {
      const parts: unknown = JSON.parse(name.slice(this.prefix.length));
      if (
        Array.isArray(parts) &&
        parts.length === 3 &&
        parts.every((part) => typeof part === 'string')
      ) {
        const [scope, endpoint, key] = parts;
        return { scope, endpoint, key };
      }
    } catch {
      // Not a record of this store.
    }
    return undefined;
  }

  /** Token, and the channel and tag to notify: only for a watched lease. */
  private leaseArguments(lease: Lease): [string, string, string] {
    return lease.watched && this.notifications
      ? [lease.token, this.channel, this.tagOf(lease.id)]
      : [lease.token, '', ''];
  }

  private keyOf({ scope, endpoint, key }: RecordId): string {
    return `${this.prefix}${JSON.stringify([scope, endpoint, key])}`;
  }

  /** The pub/sub payload of a record: a hash, so the key never travels in clear. */
  private tagOf(id: RecordId): string {
    return hash('sha256', this.keyOf(id)).slice(0, 32);
  }
}

/** A glob pattern that matches `text` literally (SCAN's MATCH). */
function globEscape(text: string): string {
  return text.replace(/[*?[\]\\]/g, (char) => `\\${char}`);
}

function redisRecordDetails(id: RecordId, hash: Record<string, string>): RecordDetails {
  const state = hash.s as RecordState;
  return {
    id,
    state,
    fingerprint: hash.f,
    token: hash.t ?? '',
    createdAt: hash.a === undefined ? null : Number(hash.a),
    expiresAt: Number(hash.x),
    response:
      state === 'completed'
        ? {
            status: Number(hash.c),
            headers: hash.h ? (JSON.parse(hash.h) as StoredResponse['headers']) : {},
            body: hash.b ?? null,
            bodyEncoding: (hash.e || 'json') as BodyEncoding,
            isError: hash.r === '1',
          }
        : null,
  };
}
