import { IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER } from '../idempotency.constants.js';
import { callIdempotently } from './idempotent-call.js';
import { isStream, type IdempotentRetryOptions } from './retry-policy.js';

/**
 * What is used of an axios instance (`axios`, `axios.create()`, or Nest's
 * `HttpService.axiosRef`), typed structurally so this package does not depend on axios: the
 * config and response types are the instance's own (`AxiosRequestConfig`, `AxiosResponse`).
 */
export interface AxiosLike {
  /** Sends one request (axios's own `request(config)`); called once per attempt. */
  request(config: never): Promise<AxiosResponseLike>;
}

/** The parts of a request config this client reads and sets; the rest goes to axios as given. */
export interface AxiosRequestLike {
  /** The request's headers: `Idempotency-Key` is added to them (an existing one is the key). */
  headers?: object;
  /** Aborts the operation: the attempt in flight and every later one. */
  signal?: unknown;
  /** The body: must be replayable (a stream is refused before any attempt). */
  data?: unknown;
}

/** The parts of an axios response this client reads: its status and headers (`Retry-After`, `Idempotent-Replayed`). */
export interface AxiosResponseLike<T = unknown> {
  /** The response body, as axios parsed it. */
  data: T;
  /** The HTTP status. */
  status: number;
  /** The response headers (axios's `AxiosHeaders` or a plain object). */
  headers: unknown;
}

/**
 * axios (and Nest's `HttpModule`) for one logical operation that must happen once: the same
 * `Idempotency-Key` on every attempt, retried like `idempotentFetch` (network errors, an attempt's
 * timeout, 409 and 429 after `Retry-After`, 5xx; backoff with jitter; `maxAttempts` in all).
 *
 * Settles as axios does: the response, or the last attempt's error (an `AxiosError` whose
 * `response` holds a status that `validateStatus` refused, a network error, or the CanceledError
 * of an attempt the caller's `signal` aborted). `data` must not be a stream: each attempt sends it
 * again (a native `FormData` is fine; the `form-data` package's is a stream).
 *
 * ```ts
 * // in a Nest provider, with HttpModule imported:
 * constructor(private readonly http: HttpService) {}
 * charge(payment: Payment) {
 *   return idempotentAxios(this.http.axiosRef, { method: 'post', url: '/charges', data: payment });
 * }
 * ```
 */
export async function idempotentAxios<Axios extends AxiosLike>(
  axios: Axios,
  config: Parameters<Axios['request']>[0],
  options: IdempotentRetryOptions = {},
): Promise<AxiosResponseLike> {
  const send = axios.request.bind(axios) as (config: object) => Promise<AxiosResponseLike>;
  const header = options.header ?? IDEMPOTENCY_KEY_HEADER;
  const { headers, signal: configSignal, data } = config as AxiosRequestLike;
  if (isStream(data)) {
    throw new TypeError(
      'idempotentAxios: data that is a stream cannot be sent again; pass an object, text or bytes',
    );
  }
  const presetKey: unknown = Object.entries(headers ?? {}).find(
    ([name]) => name.toLowerCase() === header.toLowerCase(),
  )?.[1];
  return callIdempotently<AxiosResponseLike>(
    options,
    {
      key: typeof presetKey === 'string' ? presetKey : undefined,
      signal: configSignal instanceof AbortSignal ? configSignal : undefined,
    },
    async ({ key, signal: attemptSignal }) => {
      try {
        const response = await send({
          ...(config as object),
          headers: { ...headers, [header]: key },
          signal: attemptSignal,
        });
        return {
          kind: 'answer',
          ...answerOf(response),
          settle: () => response,
        };
      } catch (error) {
        // axios rejects a status its validateStatus refuses: that is an answer, not a failure.
        const response = (error as { response?: AxiosResponseLike } | null)?.response;
        if (response && typeof response.status === 'number') {
          return {
            kind: 'answer',
            ...answerOf(response),
            settle: () => {
              throw error;
            },
          };
        }
        if (!isTransportError(error)) throw error;
        return { kind: 'failed', error };
      }
    },
  );
}

/** What the retry loop reads of a response, and how a discarded one frees its connection. */
function answerOf(response: AxiosResponseLike) {
  return {
    status: response.status,
    retryAfter: headerValue(response.headers, 'retry-after'),
    date: headerValue(response.headers, 'date'),
    replayed: headerValue(response.headers, IDEMPOTENT_REPLAYED_HEADER.toLowerCase()) === 'true',
    // A body left unread (`responseType: 'stream'`) would hold its connection.
    discard: () => {
      const body = response.data as { destroy?: () => void } | null;
      if (isStream(body) && typeof body?.destroy === 'function') body.destroy();
      return Promise.resolve();
    },
  };
}

/** axios's headers: an `AxiosHeaders` (with `get`) or a plain object of lower-case names. */
function headerValue(headers: unknown, name: string): string | undefined {
  if (!headers || typeof headers !== 'object') return undefined;
  const getter = (headers as { get?: (name: string) => unknown }).get;
  const value =
    typeof getter === 'function'
      ? getter.call(headers, name)
      : (headers as Record<string, unknown>)[name];
  return typeof value === 'string' || typeof value === 'number' ? String(value) : undefined;
}

/**
 * An error from the request itself (axios sets `request` once it sent one, and a `code` such as
 * ECONNRESET, ECONNREFUSED, ETIMEDOUT or ERR_CANCELED), as opposed to a bug in a config function.
 */
function isTransportError(error: unknown): boolean {
  const candidate = error as { isAxiosError?: unknown; code?: unknown } | null;
  return candidate?.isAxiosError === true || typeof candidate?.code === 'string';
}
