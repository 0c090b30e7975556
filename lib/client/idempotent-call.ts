import { randomUUID } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import {
  DEFAULT_MAX_ATTEMPTS,
  isRetryableStatus,
  parseRetryAfter,
  retryDelay,
  type IdempotentRetryOptions,
  type RetryReason,
} from './retry-policy.js';

/** One attempt as the transport-specific client sees it. */
export interface Attempt {
  readonly key: string;
  /** 1-based. */
  readonly attempt: number;
  /** Aborted by the caller's signal or by this attempt's timeout. */
  readonly signal: AbortSignal;
}

/** What an attempt gave, as `callIdempotently` needs it. */
export type AttemptResult<R> =
  /** An answer with a status (fetch's Response; axios's response, or its error with a response). */
  | {
      readonly kind: 'answer';
      readonly status: number;
      readonly retryAfter: string | null | undefined;
      /** The answer's `Date` header: the server's clock, which an HTTP-date `Retry-After` is on. */
      readonly date?: string | null;
      /** `Idempotent-Replayed: true`: the stored answer to this key, the same on every retry. */
      readonly replayed?: boolean;
      /** What the caller gets if this is the last attempt: return the value, or throw the error. */
      readonly settle: () => R;
      /** Frees what a discarded answer holds (an unread body). */
      readonly discard?: () => Promise<void>;
    }
  /**
   * No answer: the connection failed, or the attempt was aborted (by its timeout, or by the
   * caller: then `error` is what the operation rejects with, fetch's abort reason or axios's
   * CanceledError).
   */
  | { readonly kind: 'failed'; readonly error: unknown };

/**
 * Runs one logical operation: `send` once per attempt, all with the same key, until an answer is
 * not worth retrying, the attempts run out, or the caller aborts. Answers with a retryable status
 * (see `isRetryableStatus`) that are not replays, and failed attempts (a network error, the
 * attempt's own timeout) are retried after `retryDelay`; a failure caused by the caller's `signal`
 * ends the operation at once, with the attempt's error, or the signal's reason between attempts.
 *
 * An attempt's timeout runs until `send` returns its answer (fetch: the status and headers), not
 * while the caller reads the body afterwards: that body is the caller's, under the caller's signal.
 */
export async function callIdempotently<R>(
  retryOptions: IdempotentRetryOptions,
  request: { readonly key?: string; readonly signal?: AbortSignal },
  send: (attempt: Attempt) => Promise<AttemptResult<R>>,
): Promise<R> {
  // The request's own signal (fetch's `init.signal`, axios's `config.signal`) ends it too.
  const signal =
    request.signal && retryOptions.signal
      ? AbortSignal.any([request.signal, retryOptions.signal])
      : (retryOptions.signal ?? request.signal);
  const options = { ...retryOptions, signal };
  const key = options.key ?? request.key ?? randomUUID();
  validateRetryOptions(options);
  const maxAttempts = Math.max(1, options.maxAttempts ?? DEFAULT_MAX_ATTEMPTS);
  const sleep = options.sleep ?? ((ms, signal) => delay(ms, undefined, { signal }));
  for (let attempt = 1; ; attempt++) {
    options.signal?.throwIfAborted();
    const timeoutMs =
      typeof options.attemptTimeoutMs === 'function'
        ? options.attemptTimeoutMs(attempt)
        : options.attemptTimeoutMs;
    const timeout = timeoutMs === undefined ? undefined : attemptTimeout(timeoutMs);
    const signals = [options.signal, timeout?.signal].filter(
      (s): s is AbortSignal => s !== undefined,
    );
    const signal = signals.length === 1 ? signals[0] : AbortSignal.any(signals);

    let result: AttemptResult<R>;
    try {
      result = await send({ key, attempt, signal });
    } finally {
      // The answer is in: its body, read later by the caller, is no longer this attempt's.
      timeout?.clear();
    }
    const last = attempt >= maxAttempts;
    let reason: RetryReason;
    let retryAfterMs: number | undefined;
    if (result.kind === 'answer') {
      if (last || result.replayed || !isRetryableStatus(result.status)) return result.settle();
      reason = result.status;
      retryAfterMs = parseRetryAfter(result.retryAfter, clockOf(result.date));
    } else {
      // The caller's abort ends the operation; a network error or our own timeout is retried.
      if (options.signal?.aborted) throw result.error;
      if (last) throw result.error;
      reason = timeout?.signal.aborted ? 'timeout' : 'network';
    }
    const delayMs = retryDelay(attempt, retryAfterMs, options);
    if (result.kind === 'answer') await result.discard?.();
    options.onRetry?.({
      key,
      attempt,
      reason,
      delayMs,
      ...(result.kind === 'failed' ? { error: result.error } : {}),
    });
    try {
      await sleep(delayMs, options.signal);
    } catch (error) {
      // timers/promises rejects with an AbortError of its own: the caller gets the reason.
      throw options.signal?.aborted ? options.signal.reason : error;
    }
  }
}

/** An attempt's deadline: its signal aborts after `ms` unless `clear` was called first. */
function attemptTimeout(ms: number): { readonly signal: AbortSignal; clear(): void } {
  const controller = new AbortController();
  const timer = setTimeout(
    () =>
      controller.abort(new DOMException(`The attempt timed out after ${ms} ms`, 'TimeoutError')),
    ms,
  );
  // As AbortSignal.timeout: a pending deadline does not keep the process alive.
  timer.unref();
  return { signal: controller.signal, clear: () => clearTimeout(timer) };
}

/** The server's clock from its `Date` header (an HTTP-date `Retry-After` is on it), else ours. */
function clockOf(date: string | null | undefined): number {
  const server = date ? Date.parse(date) : Number.NaN;
  return Number.isNaN(server) ? Date.now() : server;
}

/**
 * Refuses a number option that is not a number (NaN, say, from an unset environment variable),
 * before any attempt is sent: a NaN `maxAttempts` would retry forever.
 */
function validateRetryOptions(options: IdempotentRetryOptions): void {
  const { maxAttempts, baseDelayMs, maxDelayMs, attemptTimeoutMs } = options;
  for (const [name, value] of [
    ['maxAttempts', maxAttempts],
    ['baseDelayMs', baseDelayMs],
    ['maxDelayMs', maxDelayMs],
    ['attemptTimeoutMs', typeof attemptTimeoutMs === 'function' ? undefined : attemptTimeoutMs],
  ] as const) {
    if (value !== undefined && (typeof value !== 'number' || Number.isNaN(value))) {
      throw new TypeError(
        `nestjs-idempotency client: ${name} must be a number; got ${String(value)}`,
      );
    }
  }
}
