import type { ExecutionContext } from '@nestjs/common';
import type { DataSource, DataSourceOptions } from 'typeorm';
import type { Duration } from '../utils/duration.js';
import type { IdempotencyStore } from '../storage/idempotency-store.interface.js';
import type { TransactionRunner } from '../storage/typeorm/typeorm-idempotency.store.js';
import type { ConcurrencyMode, MessageAcknowledgement } from '../core/types.js';
import type { IdempotencyEncryptionOptions } from '../security/response-sealer.js';
import type { ReplayCacheOptions } from '../replay-cache.js';
import type { ScopeValue } from '../utils/scope-value.js';

export type { ScopeValue };

export type { ConcurrencyMode };

/** What a message handler's `scope` resolver receives. */
export interface MessageScopeSource {
  /** The message's payload. */
  readonly data: unknown;
  /** The transport's context: RmqContext, NatsContext, MqttContext, RedisContext, TcpContext, KafkaContext. */
  readonly context: unknown;
}

/**
 * Identifies the caller, so keys never cross callers: a user id, an API key, a tenant. Receives the
 * platform's request object (Express `Request` or Fastify `FastifyRequest`) on HTTP and GraphQL
 * (the GraphQL context's request), and `{ data, context }` (`MessageScopeSource`: the payload and
 * the transport's context) for a message handler.
 *
 * Returns a string, a number or a bigint (`42`, `42n` and `'42'` are one caller), or `null` /
 * `undefined` for a caller without identity, who gets the empty scope `''` (shared by every such
 * caller; an authenticated caller — `request.user` set — that resolves to it is warned about once
 * per route). Anything else (an object, an array, a boolean, NaN) is refused with a 500
 * `scope-invalid` problem, logged with the route's name. An exception it throws is the request's
 * answer (an `UnauthorizedException` is a 401).
 */
// `any`, so a resolver typed for the app's own request (`(req: Request) => …`) is assignable.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type ScopeResolver = (request: any) => ScopeValue | Promise<ScopeValue>;

/**
 * Scope resolvers per transport, each typed for what it receives: `http` and `graphql` the
 * platform's request (on GraphQL, the request of its context), `rpc` the message
 * (`MessageScopeSource`: `{ data, context }`). `false` for one transport: one namespace for every
 * caller of it, on purpose. A transport left out has no scope (one namespace, with the warning for
 * authenticated callers).
 */
export interface ScopeResolversByTransport {
  /** Express `Request` or Fastify `FastifyRequest`. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  readonly http?: ((request: any) => ScopeValue | Promise<ScopeValue>) | false;
  /** The GraphQL context's request (`context.req`, or `context.request` on Fastify). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  readonly graphql?: ((request: any) => ScopeValue | Promise<ScopeValue>) | false;
  /** The message: its payload and its transport's context. */
  readonly rpc?: ((message: MessageScopeSource) => ScopeValue | Promise<ScopeValue>) | false;
}

/**
 * The `scope` option: one resolver for every transport, resolvers per transport, or `false`: every
 * caller shares one namespace on purpose (a webhook receiver, whose one caller is a gateway), which
 * also silences the warning about authenticated callers without a scope.
 */
export type ScopeOption = ScopeResolver | ScopeResolversByTransport | false;

/**
 * A function that finds a call's key: given the call's `ExecutionContext`, it returns the key (a
 * string, or an integer), or `undefined`/`null`/`''` for none (a missing key: 400 when `required`,
 * else the handler runs unprotected); or a promise of these (an async function is awaited).
 * What it throws or rejects with is the call's answer.
 */
export type KeyFunction = (
  context: ExecutionContext,
) => string | number | undefined | null | Promise<string | number | undefined | null>;

/**
 * Where a call's key is read. Whatever the source, a key is 1–255 printable ASCII characters (an
 * integer counts as its decimal string); one that is not is refused (400 `key-invalid`).
 *
 * - `{ header: 'X-Request-Id' }`: a request header (HTTP, and the HTTP request of a GraphQL call),
 *   read as `Idempotency-Key` is (a bare token or an RFC 8941 string, sent once). On messages, the
 *   transport's header: AMQP headers, NATS headers, MQTT 5 user properties, Kafka headers (Redis
 *   and TCP messages have none: their keys are then missing).
 * - `{ body: 'data.object.id' }`: HTTP, a dot path into the parsed body.
 * - `{ arg: 'input.requestId' }`: GraphQL, a dot path into the mutation field's arguments.
 * - `{ payload: 'meta.eventId' }`: messages, a dot path into the payload.
 * - a `KeyFunction` of the call's `ExecutionContext`.
 *
 * A value found by a path must be a string or an integer (a JSON body's `"id": {}` is refused,
 * 400 `key-invalid`); it is taken as it is (not parsed as an RFC 8941 string).
 */
export type KeySource =
  | {
      /** A header's name, in any case (`'X-Request-Id'`). */
      readonly header: string;
    }
  | {
      /** HTTP: a dot path into the parsed body (`'data.object.id'`). */
      readonly body: string;
    }
  | {
      /** GraphQL: a dot path into the field's arguments (`'input.requestId'`). */
      readonly arg: string;
    }
  | {
      /** Messages: a dot path into the payload (`'meta.eventId'`). */
      readonly payload: string;
    }
  | KeyFunction;

/** Key sources per transport; a transport left out reads its default (see `keyFrom`). */
export interface KeySourcesByTransport {
  /** HTTP routes (Express, Fastify): `{ header }`, `{ body }` or a function. */
  readonly http?: KeySource;
  /** GraphQL mutation fields: `{ header }` (of the HTTP request), `{ arg }` or a function. */
  readonly graphql?: KeySource;
  /** Message handlers: `{ header }` (the transport's), `{ payload }` or a function. */
  readonly rpc?: KeySource;
}

/**
 * What a retry must repeat exactly for its key to replay (else 422 `key-reused`): a function of
 * the call's payload (the HTTP body, the GraphQL field's arguments, the message's payload) and its
 * `ExecutionContext`, whose value is canonicalised (object keys sorted) and hashed with the route
 * (method and pattern, the GraphQL field, the message pattern) and the scope; or `false`: nothing,
 * every call with the key replays the first (a webhook whose sender varies a delivery's payload).
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type FingerprintOption = false | ((payload: any, context: ExecutionContext) => unknown);

/** What `onReplay` is told of a replayed response. */
export interface ReplayedResponse {
  /** The call's key. */
  readonly key: string;
  /** The call's scope (`''` without one). */
  readonly scope: string;
  /** The record's endpoint: `POST /charges`, `GRAPHQL Mutation.pay as pay`, `RPC Class.method pattern`. */
  readonly endpoint: string;
  /** The stored status (a replay sent with `replayStatus` keeps its stored one here). */
  readonly status: number;
  /** Whether the stored outcome is an error, thrown again by the replay. */
  readonly isError: boolean;
  /** The stored headers (HTTP), as the handler set them. */
  readonly headers: Readonly<Record<string, string | string[]>>;
}

/** Which response statuses are stored and replayed: a list, or a predicate. */
export type StoreStatusPolicy = readonly number[] | ((status: number) => boolean);

/** Options that `@Idempotent()` can override per route. */
export interface IdempotencyRouteOptions {
  /**
   * How long a completed key is remembered, counted from when its response was stored.
   * @default '24h'
   */
  ttl?: Duration;
  /**
   * How long a claim holds its key without a sign of life. While the handler runs, its process
   * renews the claim every `lockTimeout / 3` (see `lockRenewalLimit`), so a live handler is never
   * taken over however long it runs; a record whose process died (or stopped renewing) is taken
   * over by the first retry once `lockTimeout` has passed since its last renewal.
   * @default '1m'
   */
  lockTimeout?: Duration;
  /**
   * How long a running handler's claim is renewed. A handler still running after this is presumed
   * hung: renewal stops (logged as an error) and its key can be taken over `lockTimeout` later.
   * `0` turns renewal off (a handler longer than `lockTimeout` can then be taken over).
   * @default '15m'
   */
  lockRenewalLimit?: Duration;
  /**
   * Transactional mode: the handler runs inside a database transaction on the store's DataSource,
   * and its stored response is the last statement of that transaction, conditional on the claim
   * still being held. The handler's writes and its stored response commit together or not at all,
   * so a crash anywhere leaves both or neither. The handler writes through the transaction's
   * EntityManager: `@IdempotentTransaction()`, `IdempotencyContext.entityManager`, or
   * `@nestjs-cls/transactional` (see `transactionRunner`). PostgreSQL, PGlite and MySQL/MariaDB;
   * refused at startup on SQLite.
   * @default false
   */
  transactional?: boolean;
  /**
   * `true`: a request without `Idempotency-Key` is refused with 400.
   * `false`: it runs without idempotency.
   * @default true
   */
  required?: boolean;
  /**
   * A duplicate that arrives while the first request runs: `'reject'` answers 409 with
   * `Retry-After` (a `request-in-progress` error on GraphQL and RPC); `'wait'` waits up to
   * `waitTimeout` for the first to finish and replays its result (409 if the wait runs out).
   * @default 'reject' on HTTP and GraphQL, 'wait' for message handlers
   */
  concurrency?: ConcurrencyMode;
  /**
   * How long a duplicate waits in `'wait'` mode.
   * @default '10s'
   */
  waitTimeout?: Duration;
  /**
   * The caller's identity; keys are independent per scope (see `ScopeResolver`). Resolvers per
   * transport (`{ http, graphql, rpc }`, see `ScopeResolversByTransport`), or `false`: one
   * namespace for every caller, on purpose, without the warning about authenticated callers.
   *
   * ```ts
   * @Idempotent({ scope: { http: (req) => req.user.id, rpc: ({ data }) => data.tenantId } })
   * ```
   * @default undefined (one scope for everyone; an authenticated caller is warned about once)
   */
  scope?: ScopeOption;
  /**
   * Where the key is read (see `KeySource`), for every transport or per transport
   * (`{ http, graphql, rpc }`).
   *
   * ```ts
   * @Idempotent({ keyFrom: { body: 'data.object.id' } })              // a webhook's event id
   * @Idempotent({ keyFrom: { header: 'X-GitHub-Delivery' } })
   * @Idempotent({ keyFrom: { graphql: { arg: 'input.requestId' } } })
   * @Idempotent({ keyFrom: (context) => context.switchToHttp().getRequest().params.id })
   * ```
   * @default the `Idempotency-Key` header on HTTP; the `idempotencyKey` argument, else the header,
   * on GraphQL; the payload's `messageKeyField`, else the transport's message identity, on messages
   */
  keyFrom?: KeySource | KeySourcesByTransport;
  /**
   * What a retry must repeat exactly (see `FingerprintOption`).
   *
   * ```ts
   * @Idempotent({ fingerprint: (body: ChargeDto) => ({ amount: body.amount, to: body.to }) })
   * @Idempotent({ keyFrom: { body: 'id' }, fingerprint: false })
   * ```
   * @default the method, the URL (path and query) and the body on HTTP (with uploaded files);
   * the field's arguments on GraphQL; the payload on messages
   */
  fingerprint?: FingerprintOption;
  /**
   * Which outcomes are final (stored and replayed), as a predicate of the status and the error:
   * `error` is `undefined` for a value the handler returned, and the status of an error that is
   * not an `HttpException` (nor, on GraphQL, a coded GraphQL error; nor an RpcException) is 500.
   * Unlike `storeStatuses`, it can store such an error: a domain error class an exception filter
   * renders (`InsufficientFundsError` → 402) is replayed by throwing it again, of its own class
   * when a filter of the route or the app catches that class. Overrides `storeStatuses` where set
   * (set one of them per level, not both).
   *
   * ```ts
   * @Idempotent({ storeIf: (status, error) => error instanceof PaymentDeclined || status < 500 })
   * ```
   * @default undefined (`storeStatuses` decides)
   */
  storeIf?: (status: number, error: unknown) => boolean;
  /**
   * Calls that run as if the route had no `@Idempotent()`: no key read, nothing stored (a health
   * probe, an internal caller). Its result is read for truthiness; an async function is awaited
   * (a promise itself would skip every call). What it throws is the call's answer.
   *
   * ```ts
   * @Idempotent({ skip: (context) => context.switchToHttp().getRequest().headers['x-internal'] === '1' })
   * ```
   * @default undefined (no call is skipped)
   */
  skip?: (context: ExecutionContext) => boolean | Promise<boolean>;
  /**
   * The headers a replay sends of those the handler set (HTTP), by name in any case; the others are
   * neither stored nor replayed. `Content-Type` is always kept. `set-cookie` is refused (a cookie
   * belongs to the first caller's session).
   *
   * ```ts
   * @Idempotent({ replayHeaders: ['location', 'x-charge-id'] })
   * ```
   * @default undefined (every header the handler set, except Set-Cookie, hop-by-hop headers,
   * Content-Length, Date, ETag and X-Powered-By)
   */
  replayHeaders?: readonly string[];
  /**
   * The `Retry-After` of a 409 for a key whose first request is still running (also
   * `retryAfterSeconds` of the GraphQL and RPC errors), in whole seconds, rounded up.
   *
   * ```ts
   * @Idempotent({ retryAfter: '5s' })
   * ```
   * @default '1s'
   */
  retryAfter?: Duration;
  /**
   * Called on every replay, before the response is sent, for metrics or tagging (a span
   * attribute, a counter). A hook that throws or rejects is logged; the response never changes.
   *
   * ```ts
   * @Idempotent({ onReplay: (context, stored) => replays.inc({ endpoint: stored.endpoint }) })
   * ```
   * @default undefined
   */
  onReplay?: (context: ExecutionContext, stored: ReplayedResponse) => void | Promise<void>;
  /**
   * Which results are stored and replayed. The default stores 1xx–4xx except the statuses a client
   * is expected to correct (400, 401, 403, 408, 422, 429); those, every 5xx and every error that is
   * not an `HttpException` release the key so a retry runs the handler again.
   * @default status < 500 && ![400, 401, 403, 408, 422, 429].includes(status)
   */
  storeStatuses?: StoreStatusPolicy;
  /**
   * Status for replays of a stored 2xx response, e.g. `200`; by default the original status.
   * Stored errors always replay with their own status.
   * @default undefined (the original status)
   */
  replayStatus?: number;
  /**
   * Message handlers with manual acknowledgement (RabbitMQ `noAck: false`): settles each message
   * with its broker, exactly once, once the module knows how it ended — done, to retry, or to drop
   * (see `SettledMessage`), also when it ran without a key (`required: false`) — so the handler
   * does not acknowledge itself. `rabbitMqAcknowledgement` does it for RabbitMQ. If it throws, the
   * error is logged and the handler's answer stands.
   * @default undefined (the module acknowledges nothing)
   */
  acknowledge?: MessageAcknowledgement;
}

/** Options of `IdempotencyModule.forRoot()` / `forRootAsync()`. */
export interface IdempotencyModuleOptions extends IdempotencyRouteOptions {
  /**
   * Where records live: a TypeORM `DataSource` of your app (initialised or not; the module does
   * not close it), or `DataSourceOptions` for a connection the module opens and closes itself.
   * @default an in-memory embedded PGlite database (keys do not survive a restart)
   */
  dataSource?: DataSource | DataSourceOptions;
  /**
   * With neither `dataSource` nor `store`, keys live in an in-memory PGlite database: a restart
   * forgets them and other instances never see them, so a retry that reaches another process, or
   * comes after a deploy, runs the handler again. Under `NODE_ENV=production` that default is
   * refused at startup unless this is `true`.
   * @default false
   */
  allowInMemoryStore?: boolean;
  /**
   * Encrypts stored responses (bodies and headers) with AES-256-GCM under the first of `keys`;
   * every key listed opens them (rotation). The record's scope, endpoint and key are authenticated,
   * so a response copied to another record does not replay. A response that cannot be opened is
   * answered with a 500 problem (`response-unreadable`) and its handler is not run again.
   * @default undefined (stored in clear)
   */
  encryption?: IdempotencyEncryptionOptions;
  /**
   * Keeps the completed records this process has read, so later retries of those keys replay
   * without a round trip to the store. A completed record cannot change before its TTL ends, and an
   * entry is dropped then, so the cache never answers what the store would not. Bounded (oldest
   * first); `false` turns it off. A record deleted by hand from the store keeps
   * replaying from the caches that hold it until its TTL ends.
   * @default { maxEntries: 10000, maxBytes: 16 MiB }
   */
  replayCache?: ReplayCacheOptions | false;
  /**
   * A store of your own instead of the TypeORM one; `dataSource` is then ignored.
   * @default TypeOrmIdempotencyStore on `dataSource`
   */
  store?: IdempotencyStore;
  /**
   * The payload field of a message handler's key (a string, or an integer); without it, the
   * transport's own message identity (RabbitMQ `idempotency-key` header or `message_id`, NATS
   * `Nats-Msg-Id`, MQTT 5 user property, Kafka header or offset).
   * @default 'idempotencyKey'
   */
  messageKeyField?: string;
  /**
   * How a transactional route opens its transaction, for instance to let
   * `@nestjs-cls/transactional` own it: `(work) => txHost.withTransaction(() => work(txHost.tx))`.
   * It must be a transaction of the store's DataSource. Ignored with a custom `store`.
   * @default (work) => dataSource.transaction(work)
   */
  transactionRunner?: TransactionRunner;
  /**
   * Create the table on startup (idempotent migrations). Turn off if you run the three migrations
   * (`CreateIdempotencyRecords1763900000000`, `IdempotencyRecordsExactIds1767000000000`,
   * `IdempotencyRecordsHotCompletion1768000000000`) with your own; the module then warns at
   * startup when the table or its latest column is missing.
   * @default true
   */
  runMigrations?: boolean;
  /**
   * How often expired records are purged; `false` or `0` turns the purge off.
   * @default '1m'
   */
  purgeInterval?: Duration | false;
  /**
   * Rows deleted per purge statement; the purge repeats batches until none are left. Larger
   * batches purge faster (fewer commits), each holding its rows' locks a little longer.
   * @default 5000
   */
  purgeBatchSize?: number;
  /**
   * How often a waiting duplicate (`concurrency: 'wait'`) re-reads the record when the store does
   * not push changes (PGlite, MySQL/MariaDB, SQLite, `waitNotifications: false`, or PostgreSQL
   * while the listening connection is down). With notifications a waiter re-reads only as a
   * safety net, every `max(waitPollInterval, 1s)`.
   * @default '50ms'
   */
  waitPollInterval?: Duration;
  /**
   * On PostgreSQL (`pg` driver), wake waiting duplicates through LISTEN/NOTIFY instead of polling:
   * the completion or release of a key in a `'wait'` route sends a NOTIFY, and each process holds
   * one extra connection, opened on its first wait, that LISTENs. Behind a pooler in transaction
   * mode (PgBouncer), where a LISTEN does not hold, the listener finds out (its probe NOTIFY never
   * comes back) and waiters poll, unless `listenerUrl` gives it a direct connection. `false`:
   * waiters always poll every `waitPollInterval`. Ignored with a custom `store` and on other
   * databases.
   * @default true
   */
  waitNotifications?: boolean;
  /**
   * The LISTEN connection's own connection string, straight to PostgreSQL (or through a pooler in
   * session mode), when the DataSource goes through a pooler in transaction mode. Only that one
   * connection per process uses it; every statement still goes through the DataSource.
   * @default the DataSource pool's own connection options
   */
  listenerUrl?: string;
  /**
   * How long one store operation (claim, complete, release) may take. A claim that takes longer
   * answers 503 and the handler does not run: a database that hangs costs clients a bounded wait,
   * not a pile of stuck requests.
   * @default '5s'
   */
  storeTimeout?: Duration;
  /**
   * Largest response body stored, in bytes of its serialised form. A larger response is sent to the
   * client as usual but not stored: its key is released and a warning is logged.
   * @default 1048576 (1 MiB)
   */
  maxResponseBytes?: number;
}
