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
      /** What the caller gets if this is the last attempt: return the value, or throw the error. */
      readonly settle: () => R;
      /** Frees what a discarded answer holds (an unread body). */
      readonly discard?: () => Promise<void>;
    }
  /** No answer: the connection failed, or the attempt was aborted. */
  | { readonly kind: 'failed'; readonly error: unknown };

/**
 * Runs one logical operation: `send` once per attempt, all with the same key, until an answer is
 * not worth retrying, the attempts run out, or the caller aborts. Answers with a retryable status
 * (see `isRetryableStatus`) and failed attempts (a network error, the attempt's own timeout) are
 * retried after `retryDelay`; a failure caused by the caller's `signal` ends the operation at once.
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
  const maxAttempts = Math.max(1, options.maxAttempts ?? DEFAULT_MAX_ATTEMPTS);
  const sleep = options.sleep ?? ((ms, signal) => delay(ms, undefined, { signal }));
  for (let attempt = 1; ; attempt++) {
    options.signal?.throwIfAborted();
    const timeoutMs =
      typeof options.attemptTimeoutMs === 'function'
        ? options.attemptTimeoutMs(attempt)
        : options.attemptTimeoutMs;
    const timeout = timeoutMs === undefined ? undefined : AbortSignal.timeout(timeoutMs);
    const signals = [options.signal, timeout].filter((s): s is AbortSignal => s !== undefined);
    const signal = signals.length === 1 ? signals[0] : AbortSignal.any(signals);

    const result = await send({ key, attempt, signal });
    const last = attempt >= maxAttempts;
    let reason: RetryReason;
    let retryAfterMs: number | undefined;
    if (result.kind === 'answer') {
      if (last || !isRetryableStatus(result.status)) return result.settle();
      reason = result.status;
      retryAfterMs = parseRetryAfter(result.retryAfter);
    } else {
      // The caller's abort ends the operation; a network error or our own timeout is retried.
      if (options.signal?.aborted) throw options.signal.reason;
      if (last) throw result.error;
      reason = timeout?.aborted ? 'timeout' : 'network';
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
    await sleep(delayMs, options.signal);
  }
}
