import { HttpException } from '@nestjs/common';
import { rejection, type IdempotencyRejection } from './idempotency-rejection.js';

/** RFC 9457 problem details, as this module sends them. */
export interface ProblemDetails {
  /** A `tag:` URI (RFC 4151): a stable identifier that is not meant to be fetched. */
  readonly type: string;
  /** A short summary of the problem, the same for every occurrence of its type. */
  readonly title: string;
  /** The HTTP status code of the response. */
  readonly status: number;
  /** What went wrong with this request, for a human reader. */
  readonly detail: string;
}

/** The media type of every error response of this module (RFC 9457): `application/problem+json`. */
export const PROBLEM_CONTENT_TYPE = 'application/problem+json';
const PROBLEM_TYPE_BASE = 'tag:nestjs-idempotency,2026:';

/**
 * Base of every error this module answers with on HTTP: a rejection (see `IdempotencyRejection`,
 * whose code, status and text it carries) as RFC 9457 problem details. The interceptor sets
 * `Content-Type: application/problem+json` and `headers` on the response before the exception
 * reaches the exception filters, so the default filter sends it as it is.
 */
export abstract class IdempotencyException extends HttpException {
  /** Headers to send with the problem (besides its Content-Type): `Retry-After` when a retry may succeed. */
  readonly headers: Readonly<Record<string, string>>;

  /** @param rejection The rejection this exception renders: its code, status, text and retry delay. */
  protected constructor(readonly rejection: IdempotencyRejection) {
    const problem: ProblemDetails = {
      type: PROBLEM_TYPE_BASE + rejection.code,
      title: rejection.title,
      status: rejection.status,
      detail: rejection.detail,
    };
    super(problem, rejection.status);
    this.headers =
      rejection.retryAfterSeconds === undefined
        ? {}
        : { 'Retry-After': String(rejection.retryAfterSeconds) };
  }
}

/** 400: the route requires an Idempotency-Key and the request has none. */
export class IdempotencyKeyMissingException extends IdempotencyException {
  constructor() {
    super(rejection('key-missing'));
  }
}

/** 400: the Idempotency-Key header is unusable (empty, too long, not ASCII, malformed, repeated). */
export class IdempotencyKeyInvalidException extends IdempotencyException {
  constructor(reason: string) {
    super(rejection('key-invalid', { detail: reason }));
  }
}

/**
 * 400: the request body cannot be fingerprinted (nested beyond what can be hashed, too large to be
 * read ahead of its parser, cut short); `detail` says which.
 */
export class IdempotencyBodyUnreadableException extends IdempotencyException {
  constructor(detail?: string) {
    super(rejection('body-unreadable', { detail }));
  }
}

/** 422: the key was first used with another method, URL or body. */
export class IdempotencyKeyReusedException extends IdempotencyException {
  constructor() {
    super(rejection('key-reused'));
  }
}

/** 409: the first request with this key is still running. */
export class IdempotencyRequestInProgressException extends IdempotencyException {
  constructor(retryAfterSeconds: number) {
    super(rejection('request-in-progress', { retryAfterSeconds }));
  }
}

/** 503: the record could not be read or claimed, so the handler was not run. */
export class IdempotencyStoreUnavailableException extends IdempotencyException {
  constructor() {
    super(rejection('store-unavailable'));
  }
}

/**
 * 409: a transactional route's claim was taken over before its result was stored (its process
 * stopped renewing it for lockTimeout); its transaction was rolled back. The request that took the
 * key over owns the operation now: a retry with the same key gets its result.
 */
export class IdempotencyLeaseLostException extends IdempotencyException {
  constructor() {
    super(rejection('lease-lost'));
  }
}

/**
 * 500: a transactional route produced a result that cannot be stored (a status that is not kept, a
 * response over maxResponseBytes, a stream). Its writes were rolled back and its key released, so
 * a retry with the same key runs the handler again.
 */
export class IdempotencyResultNotStoredException extends IdempotencyException {
  constructor() {
    super(rejection('result-not-stored'));
  }
}

/**
 * 500: the key completed, but its stored response cannot be opened (sealed under keys that are not
 * configured, tampered with, copied from another record). The operation is not run again.
 */
export class IdempotencyResponseUnreadableException extends IdempotencyException {
  constructor() {
    super(rejection('response-unreadable'));
  }
}

/**
 * 500: the route's `scope` resolver returned something that cannot be a caller's identity (an
 * object, an array, a boolean, NaN): a configuration error, logged with the route's name. The
 * request was not processed.
 */
export class IdempotencyScopeInvalidException extends IdempotencyException {
  constructor() {
    super(rejection('scope-invalid'));
  }
}

/**
 * The HTTP exception of a rejection: the class of its code (so `instanceof` in an exception filter
 * works as before), with the rejection's detail and Retry-After.
 */
export function httpExceptionFor(refusal: IdempotencyRejection): IdempotencyException {
  switch (refusal.code) {
    case 'key-missing':
      return new IdempotencyKeyMissingException();
    case 'key-invalid':
      return new IdempotencyKeyInvalidException(refusal.detail);
    case 'body-unreadable':
      return new IdempotencyBodyUnreadableException(refusal.detail);
    case 'key-reused':
      return new IdempotencyKeyReusedException();
    case 'request-in-progress':
      return new IdempotencyRequestInProgressException(refusal.retryAfterSeconds ?? 1);
    case 'store-unavailable':
      return new IdempotencyStoreUnavailableException();
    case 'lease-lost':
      return new IdempotencyLeaseLostException();
    case 'result-not-stored':
      return new IdempotencyResultNotStoredException();
    case 'response-unreadable':
      return new IdempotencyResponseUnreadableException();
    case 'scope-invalid':
      return new IdempotencyScopeInvalidException();
  }
}
