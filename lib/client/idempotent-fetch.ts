import { IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER } from '../idempotency.constants.js';
import { callIdempotently } from './idempotent-call.js';
import { isStream, type IdempotentRetryOptions } from './retry-policy.js';

export interface IdempotentFetchOptions extends IdempotentRetryOptions {
  /** The fetch to call. Default the global `fetch`. */
  readonly fetch?: typeof fetch;
}

/**
 * `fetch` for one logical operation that must happen once: the same `Idempotency-Key` on every
 * attempt, retried on network errors, on an attempt's timeout, on 409 and 429 (after their
 * `Retry-After`) and on 5xx, with exponential backoff and full jitter, `maxAttempts` in all.
 *
 * Resolves to the last `Response`, whatever its status, as `fetch` does (check `response.ok`);
 * rejects with the last network error when no attempt got an answer, or with the abort reason
 * when `signal` is aborted. A body must be replayable (a string, bytes, `URLSearchParams`,
 * `FormData`, `Blob`), not a stream (a `ReadableStream`, a Node stream, an async iterable): each
 * attempt sends it again. `attemptTimeoutMs` runs until an attempt's headers arrive: the body of
 * the response returned is then read under `signal` alone.
 *
 * ```ts
 * const response = await idempotentFetch('https://shop.example/payments', {
 *   method: 'POST',
 *   headers: { 'Content-Type': 'application/json' },
 *   body: JSON.stringify({ amount: 1000, currency: 'eur' }),
 * }, { attemptTimeoutMs: 5000 });
 * ```
 */
export async function idempotentFetch(
  input: string | URL | Request,
  init: RequestInit = {},
  options: IdempotentFetchOptions = {},
): Promise<Response> {
  if (isStream(init.body)) {
    throw new TypeError('idempotentFetch: a stream body cannot be sent again; pass bytes or text');
  }
  const send = options.fetch ?? fetch;
  const header = options.header ?? IDEMPOTENCY_KEY_HEADER;
  const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : {}));
  return callIdempotently<Response>(
    options,
    { key: headers.get(header) ?? undefined, signal: init.signal ?? undefined },
    async ({ key, signal: attemptSignal }) => {
      headers.set(header, key);
      try {
        const request = input instanceof Request ? input.clone() : input;
        const response = await send(request, { ...init, headers, signal: attemptSignal });
        return {
          kind: 'answer',
          status: response.status,
          retryAfter: response.headers.get('retry-after'),
          date: response.headers.get('date'),
          replayed: response.headers.get(IDEMPOTENT_REPLAYED_HEADER) === 'true',
          settle: () => response,
          discard: async () => {
            await response.body?.cancel();
          },
        };
      } catch (error) {
        return { kind: 'failed', error };
      }
    },
  );
}
