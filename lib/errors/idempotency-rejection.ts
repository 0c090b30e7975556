/**
 * Why the module answered a call itself instead of running (or storing) its handler. The same
 * codes on every transport: HTTP renders them as problem+json (`type` ends in the code), GraphQL
 * as an error with `extensions.code` (`IDEMPOTENCY_` + the code in upper snake case), RPC as an
 * RpcException whose error object carries `code`.
 */
export type RejectionCode =
  | 'key-missing'
  | 'key-invalid'
  | 'body-unreadable'
  | 'key-reused'
  | 'request-in-progress'
  | 'store-unavailable'
  | 'lease-lost'
  | 'result-not-stored'
  | 'response-unreadable'
  | 'scope-invalid';

/** A rejection before a transport renders it. */
export interface IdempotencyRejection {
  /** Which rejection it is, the same on every transport (`key-reused`, `request-in-progress`, …). */
  readonly code: RejectionCode;
  /** The HTTP status this rejection stands for (409, 422, …); RPC and GraphQL carry it too. */
  readonly status: number;
  /** A short summary, the same for every rejection of its code. */
  readonly title: string;
  /** What went wrong with this request, for a human reader. */
  readonly detail: string;
  /** When a retry may succeed (409, 503): seconds. */
  readonly retryAfterSeconds?: number;
}

/** Each code's status and text, and when a retry may succeed (the rejections a retry can outlast). */
const REJECTIONS: Record<RejectionCode, Omit<IdempotencyRejection, 'code'>> = {
  'key-missing': {
    status: 400,
    title: 'Idempotency-Key is missing',
    detail:
      'This operation requires an Idempotency-Key, e.g. a UUID v4 that you send again on every retry of the same operation.',
  },
  'key-invalid': {
    status: 400,
    title: 'Idempotency-Key is invalid',
    detail: 'The Idempotency-Key is invalid.',
  },
  'body-unreadable': {
    status: 400,
    title: 'Request body cannot be fingerprinted',
    detail: 'The request body is too deeply nested to be compared with later retries.',
  },
  'key-reused': {
    status: 422,
    title: 'Idempotency-Key reused with a different request',
    detail:
      'This Idempotency-Key was already used with a different request payload. Use a new key for a new operation.',
  },
  'request-in-progress': {
    status: 409,
    title: 'A request with this Idempotency-Key is in progress',
    detail:
      'The first request with this Idempotency-Key has not finished yet. Retry later with the same key to receive its result.',
  },
  'store-unavailable': {
    status: 503,
    title: 'Idempotency store unavailable',
    detail:
      'The request was not processed because its Idempotency-Key could not be checked. Retry later with the same key.',
    retryAfterSeconds: 1,
  },
  'lease-lost': {
    status: 409,
    title: 'This attempt lost its claim on the Idempotency-Key',
    detail:
      'Another request with this Idempotency-Key took the operation over while this one ran, so nothing of this attempt was committed. Retry with the same key to receive the result of the operation.',
    retryAfterSeconds: 1,
  },
  'result-not-stored': {
    status: 500,
    title: 'The result could not be stored',
    detail:
      'The operation produced a result that cannot be stored for replay, so nothing of it was committed. Retry with the same key to run it again.',
  },
  'response-unreadable': {
    status: 500,
    title: 'The stored result cannot be read',
    detail:
      'This Idempotency-Key was completed, but its stored result cannot be read back, so it is not sent again; the operation was not run again either.',
  },
  'scope-invalid': {
    status: 500,
    title: 'The caller could not be identified',
    detail:
      "The route's `scope` resolver returned no caller identity for this request (a string, a number or a bigint), so the request was not processed.",
  },
};

/** The rejection `code`, with its standard text and retry delay; `detail` and `retryAfterSeconds` as given. */
export function rejection(
  code: RejectionCode,
  extra: { readonly detail?: string; readonly retryAfterSeconds?: number } = {},
): IdempotencyRejection {
  const standard = REJECTIONS[code];
  return {
    code,
    status: standard.status,
    title: standard.title,
    detail: extra.detail ?? standard.detail,
    retryAfterSeconds: extra.retryAfterSeconds ?? standard.retryAfterSeconds,
  };
}

/** Thrown inside the module to stop a call with a rejection; the transport renders it. */
export class IdempotencyRejectionError extends Error {
  /** @param rejection The rejection to render. */
  constructor(readonly rejection: IdempotencyRejection) {
    super(rejection.title);
  }
}

/** `key-reused` → `IDEMPOTENCY_KEY_REUSED`: the GraphQL `extensions.code` of a rejection. */
export function graphqlCodeOf(code: RejectionCode): string {
  return `IDEMPOTENCY_${code.replaceAll('-', '_').toUpperCase()}`;
}
