export { idempotentFetch, type IdempotentFetchOptions } from './idempotent-fetch.js';
export {
  idempotentAxios,
  type AxiosLike,
  type AxiosRequestLike,
  type AxiosResponseLike,
} from './idempotent-axios.js';
export {
  isRetryableStatus,
  parseRetryAfter,
  retryDelay,
  type IdempotentRetryOptions,
  type RetryEvent,
  type RetryReason,
} from './retry-policy.js';
