/** Metadata key under which `@Idempotent()` stores its per-route options. */
export const IDEMPOTENT_ROUTE_OPTIONS = 'IDEMPOTENCY:ROUTE_OPTIONS';

/** The request header that carries the client's key (IETF draft-ietf-httpapi-idempotency-key-header). */
export const IDEMPOTENCY_KEY_HEADER = 'idempotency-key';

/** Set on every replayed response (Stripe's name for it). */
export const IDEMPOTENT_REPLAYED_HEADER = 'Idempotent-Replayed';

/** The longest key accepted, in characters. */
export const MAX_KEY_LENGTH = 255;

/** Statuses a client is expected to correct and retry with the same key: they release the key. */
export const RELEASING_CLIENT_STATUSES: readonly number[] = [400, 401, 403, 408, 422, 429];

/**
 * Response headers never stored: cookies belong to the first caller's session, hop-by-hop headers
 * describe one connection, and the rest are recomputed by the platform on every response.
 */
export const UNSTORED_RESPONSE_HEADERS: ReadonlySet<string> = new Set([
  'set-cookie',
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'trailers',
  'transfer-encoding',
  'upgrade',
  'content-length',
  'date',
  'etag',
  'x-powered-by',
  'idempotent-replayed',
]);

/**
 * The `Retry-After` (seconds) of a 409 for a key whose first request is still running: a hint to
 * try again soon, since most handlers finish within a second. Not the claim's remaining lock,
 * which a live handler keeps renewing (40–60 s with the default `lockTimeout`): a client that
 * honoured that would wait a minute for an answer that was ready in milliseconds. A retry that
 * comes too early gets another 409, answered by one read.
 */
export const IN_PROGRESS_RETRY_AFTER_SECONDS = 1;

export const DEFAULTS = {
  ttl: '24h',
  lockTimeout: '1m',
  lockRenewalLimit: '15m',
  transactional: false,
  required: true,
  messageKeyField: 'idempotencyKey',
  waitTimeout: '10s',
  waitPollInterval: '50ms',
  waitNotifications: true,
  purgeInterval: '1m',
  purgeBatchSize: 5000,
  maxResponseBytes: 1024 * 1024,
  storeTimeout: '5s',
  runMigrations: true,
} as const;
