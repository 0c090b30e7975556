/**
 * When an outgoing idempotent call is tried again, and after how long. Pure: the fetch and axios
 * clients (idempotent-fetch.ts, idempotent-axios.ts) drive it through `callIdempotently`.
 */

/** Options of `idempotentFetch` and `idempotentAxios`. */
export interface IdempotentRetryOptions {
  /**
   * The operation's key, sent unchanged on every attempt. Default: a new UUID v4 per call, or the
   * `Idempotency-Key` the request already carries. Pass your own (stored with the operation) to
   * keep one key across restarts of the caller.
   */
  readonly key?: string;
  /** The header that carries the key. Default `Idempotency-Key`. */
  readonly header?: string;
  /** Attempts in all, the first included. Default 5. */
  readonly maxAttempts?: number;
  /** The first retry's delay before jitter; it doubles on every further retry. Default 200 ms. */
  readonly baseDelayMs?: number;
  /**
   * The longest wait between two attempts, `Retry-After` included: a longer `Retry-After` is cut
   * to this. Default 10 000 ms. (Other servers may ask for minutes; this library's 409 asks for
   * one second.)
   */
  readonly maxDelayMs?: number;
  /**
   * Abandons an attempt that has not answered after this long and retries (a lost response). A
   * function of the attempt number (1-based) may let later attempts wait longer. Default: none.
   * It covers an attempt until its answer is returned: with fetch, the status and headers (the
   * body is then yours to read, under `signal` only: pass `AbortSignal.timeout()` there for a
   * deadline on the whole call); with axios, the whole response (its body is read by then, unless
   * `responseType: 'stream'`).
   */
  readonly attemptTimeoutMs?: number | ((attempt: number) => number);
  /**
   * Ends the whole operation: the current attempt is aborted and no other is made. The call rejects
   * as the attempt does (fetch: with the signal's reason; axios: with its CanceledError), or with
   * the signal's reason while waiting for the next attempt.
   */
  readonly signal?: AbortSignal;
  /** Called before each retry, with why the attempt failed and how long until the next. */
  readonly onRetry?: (retry: RetryEvent) => void;
  /** Jitter's random source, in [0, 1). Default `Math.random`. */
  readonly random?: () => number;
  /** How a delay is waited out. Default a timer, cut short by `signal`. */
  readonly sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** Why an attempt is retried: a network error, its own timeout, or a retryable status. */
export type RetryReason = 'network' | 'timeout' | number;

/** What `onRetry` is told before each retry. */
export interface RetryEvent {
  /** The operation's `Idempotency-Key`, the same on every attempt. */
  readonly key: string;
  /** The attempt that failed, 1-based. */
  readonly attempt: number;
  /** Why the attempt failed: `'network'`, `'timeout'`, or the status it answered. */
  readonly reason: RetryReason;
  /** The wait before the next attempt, jitter and `Retry-After` included. */
  readonly delayMs: number;
  /** The error of a failed attempt (network or timeout). */
  readonly error?: unknown;
}

export const DEFAULT_MAX_ATTEMPTS = 5;
export const DEFAULT_BASE_DELAY_MS = 200;
export const DEFAULT_MAX_DELAY_MS = 10_000;

/**
 * Statuses worth another attempt with the same key: 409 (the first attempt is still running:
 * its result comes with the key), 429, and every 5xx (the server failed before storing a result,
 * or released the key). A 4xx other than those is the request's own fault: retrying cannot help.
 * The clients never retry a replay (`Idempotent-Replayed: true`), whatever its status: it is the
 * key's stored answer, and every retry would get it again.
 */
export function isRetryableStatus(status: number): boolean {
  return status === 409 || status === 429 || (status >= 500 && status <= 599);
}

/**
 * The wait before retry number `retry` (1 for the first retry): exponential backoff with full
 * jitter (a random share of `base · 2^(retry−1)`, capped at `maxDelayMs`), at least the server's `Retry-After`, and at
 * most `maxDelayMs`.
 */
export function retryDelay(
  retry: number,
  retryAfterMs: number | undefined,
  options: IdempotentRetryOptions,
): number {
  const base = options.baseDelayMs ?? DEFAULT_BASE_DELAY_MS;
  const max = options.maxDelayMs ?? DEFAULT_MAX_DELAY_MS;
  const ceiling = Math.min(max, base * 2 ** (retry - 1));
  const jittered = Math.floor((options.random ?? Math.random)() * ceiling);
  return Math.min(max, Math.max(jittered, retryAfterMs ?? 0));
}

/**
 * `Retry-After` in ms: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); else undefined. `now` is
 * the clock an HTTP-date is read against: the clients pass the server's (its `Date` header).
 */
export function parseRetryAfter(
  value: string | null | undefined,
  now = Date.now(),
): number | undefined {
  if (value === null || value === undefined) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  // HTTP-dates are in GMT (IMF-fixdate, and the obsolete RFC 850 and asctime forms); asctime does
  // not say so, and Date.parse would read it in the local time zone.
  const date = /^[A-Za-z]{3}/.test(text)
    ? Date.parse(/\bGMT$/i.test(text) ? text : `${text} GMT`)
    : Number.NaN;
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/**
 * A request body that is consumed by sending it (a WHATWG `ReadableStream`, a Node stream, an
 * async iterable), so a retry could not send it again.
 */
export function isStream(body: unknown): boolean {
  if (typeof body !== 'object' || body === null) return false;
  return (
    (typeof ReadableStream !== 'undefined' && body instanceof ReadableStream) ||
    typeof (body as { pipe?: unknown }).pipe === 'function' ||
    typeof (body as { [Symbol.asyncIterator]?: unknown })[Symbol.asyncIterator] === 'function'
  );
}
