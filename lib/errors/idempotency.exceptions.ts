import { HttpException, HttpStatus } from '@nestjs/common';
import type { IdempotencyRejection } from './idempotency-rejection.js';

/** RFC 9457 problem details, as this module sends them. */
export interface ProblemDetails {
  /** A `tag:` URI (RFC 4151): a stable identifier that is not meant to be fetched. */
  readonly type: string;
  readonly title: string;
  readonly status: number;
  readonly detail: string;
}

export const PROBLEM_CONTENT_TYPE = 'application/problem+json';
const PROBLEM_TYPE_BASE = 'tag:nestjs-idempotency,2026:';

/**
 * Base of every error this module answers with. The body is RFC 9457 problem details; the
 * interceptor sets `Content-Type: application/problem+json` and `headers` on the response before
 * the exception reaches the exception filters, so the default filter sends it as it is.
 */
export abstract class IdempotencyException extends HttpException {
  /** Headers to send with the problem (besides its Content-Type). */
  readonly headers: Readonly<Record<string, string>>;

  protected constructor(
    status: HttpStatus,
    slug: string,
    title: string,
    detail: string,
    headers: Record<string, string> = {},
  ) {
    const problem: ProblemDetails = { type: PROBLEM_TYPE_BASE + slug, title, status, detail };
    super(problem, status);
    this.headers = headers;
  }
}

/** 400: the route requires an Idempotency-Key and the request has none. */
export class IdempotencyKeyMissingException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.BAD_REQUEST,
      'key-missing',
      'Idempotency-Key is missing',
      'This operation requires an Idempotency-Key header, e.g. a UUID v4 that you send again on every retry of the same operation.',
    );
  }
}

/** 400: the Idempotency-Key header is unusable (empty, too long, not ASCII, malformed, repeated). */
export class IdempotencyKeyInvalidException extends IdempotencyException {
  constructor(reason: string) {
    super(HttpStatus.BAD_REQUEST, 'key-invalid', 'Idempotency-Key is invalid', reason);
  }
}

/** 400: the request body cannot be fingerprinted (for example nested beyond what can be hashed). */
export class IdempotencyBodyUnreadableException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.BAD_REQUEST,
      'body-unreadable',
      'Request body cannot be fingerprinted',
      'The request body is too deeply nested to be compared with later retries.',
    );
  }
}

/** 422: the key was first used with another method, URL or body. */
export class IdempotencyKeyReusedException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.UNPROCESSABLE_ENTITY,
      'key-reused',
      'Idempotency-Key reused with a different request',
      'This Idempotency-Key was already used with a different request payload. Use a new key for a new operation.',
    );
  }
}

/** 409: the first request with this key is still running. */
export class IdempotencyRequestInProgressException extends IdempotencyException {
  constructor(retryAfterSeconds: number) {
    super(
      HttpStatus.CONFLICT,
      'request-in-progress',
      'A request with this Idempotency-Key is in progress',
      'The first request with this Idempotency-Key has not finished yet. Retry later with the same key to receive its result.',
      { 'Retry-After': String(retryAfterSeconds) },
    );
  }
}

/** 503: the record could not be read or claimed, so the handler was not run. */
export class IdempotencyStoreUnavailableException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.SERVICE_UNAVAILABLE,
      'store-unavailable',
      'Idempotency store unavailable',
      'The request was not processed because its Idempotency-Key could not be checked. Retry later with the same key.',
      { 'Retry-After': '1' },
    );
  }
}

/**
 * 409: a transactional route's claim was taken over before its result was stored (its process
 * stopped renewing it for lockTimeout); its transaction was rolled back. The request that took the
 * key over owns the operation now: a retry with the same key gets its result.
 */
export class IdempotencyLeaseLostException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.CONFLICT,
      'lease-lost',
      'This attempt lost its claim on the Idempotency-Key',
      'Another request with this Idempotency-Key took the operation over while this one ran, so nothing of this attempt was committed. Retry with the same key to receive the result of the operation.',
      { 'Retry-After': '1' },
    );
  }
}

/**
 * 500: a transactional route produced a result that cannot be stored (a status that is not kept, a
 * response over maxResponseBytes, a stream). Its writes were rolled back and its key released, so
 * a retry with the same key runs the handler again.
 */
export class IdempotencyResultNotStoredException extends IdempotencyException {
  constructor() {
    super(
      HttpStatus.INTERNAL_SERVER_ERROR,
      'result-not-stored',
      'The result could not be stored',
      'The operation produced a result that cannot be stored for replay, so nothing of it was committed. Retry with the same key to run it again.',
    );
  }
}

/**
 * The HTTP exception of a rejection: the class of its code (so `instanceof` in an exception filter
 * works as before), with the rejection's detail and Retry-After.
 */
export function httpExceptionFor(rejection: IdempotencyRejection): IdempotencyException {
  switch (rejection.code) {
    case 'key-missing':
      return new IdempotencyKeyMissingException();
    case 'key-invalid':
      return new IdempotencyKeyInvalidException(rejection.detail);
    case 'body-unreadable':
      return new IdempotencyBodyUnreadableException();
    case 'key-reused':
      return new IdempotencyKeyReusedException();
    case 'request-in-progress':
      return new IdempotencyRequestInProgressException(rejection.retryAfterSeconds ?? 1);
    case 'store-unavailable':
      return new IdempotencyStoreUnavailableException();
    case 'lease-lost':
      return new IdempotencyLeaseLostException();
    case 'result-not-stored':
      return new IdempotencyResultNotStoredException();
  }
}
