import { IDEMPOTENT_REPLAYED_HEADER, MAX_KEY_LENGTH } from '../idempotency.constants.js';
import {
  IdempotencyBodyUnreadableException,
  IdempotencyKeyInvalidException,
  IdempotencyKeyMissingException,
  IdempotencyKeyReusedException,
  IdempotencyRequestInProgressException,
  IdempotencyStoreUnavailableException,
  PROBLEM_CONTENT_TYPE,
  type IdempotencyException,
  type ProblemDetails,
} from '../errors/idempotency.exceptions.js';

/**
 * OpenAPI 3 objects describing what `@Idempotent()` adds to an operation, as plain data (no
 * dependency on `@nestjs/swagger`). The problem examples are built from the exceptions the
 * interceptor throws, so the document shows the bodies clients really get.
 */

/** The request header's name as documented (HTTP header names are case-insensitive). */
export const KEY_HEADER_NAME = 'Idempotency-Key';

/**
 * The key's header parameter of an operation: `Idempotency-Key`, or the header a route's
 * `keyFrom` names.
 */
export function keyHeaderParameter(
  required: boolean,
  name: string = KEY_HEADER_NAME,
): Record<string, unknown> {
  return {
    name,
    in: 'header',
    required,
    description: required
      ? 'A unique key for this operation (e.g. a UUID v4), sent again unchanged on every retry: a retry gets the first response back instead of running the operation again. Required.'
      : 'A unique key for this operation (e.g. a UUID v4), sent again unchanged on every retry: a retry gets the first response back instead of running the operation again. Optional: without it the request runs unprotected.',
    schema: {
      type: 'string',
      minLength: 1,
      maxLength: MAX_KEY_LENGTH,
      example: '8e03978e-40d5-43e8-bc93-6894a57f9324',
    },
  };
}

/** The `Idempotent-Replayed` header of a response that may be a replay. */
export const REPLAYED_RESPONSE_HEADER = {
  [IDEMPOTENT_REPLAYED_HEADER]: {
    description:
      'Present, with the value `true`, when this response is the stored response of an earlier request with the same Idempotency-Key (the operation did not run again).',
    schema: { type: 'string', enum: ['true'] },
  },
};

const RETRY_AFTER_HEADER = {
  'Retry-After': {
    description: 'Seconds to wait before retrying with the same Idempotency-Key.',
    schema: { type: 'integer', minimum: 1 },
  },
};

/**
 * The error responses of an idempotent operation, by status. Without a required key there is no
 * `key-missing` 400, but a malformed key is still refused; without a fingerprint
 * (`fingerprint: false`) no 422, since every payload under a key is the same request.
 */
export function problemResponses(
  required: boolean,
  route: {
    /** Whether a key can be refused as reused with another payload (not with `fingerprint: false`). */
    readonly keyReused?: boolean;
    /** The route's `retryAfter`, in seconds. */
    readonly retryAfterSeconds?: number;
  } = {},
): Record<number, Record<string, unknown>> {
  const { keyReused = true, retryAfterSeconds = 1 } = route;
  const badRequest: IdempotencyException[] = [
    ...(required ? [new IdempotencyKeyMissingException()] : []),
    new IdempotencyKeyInvalidException('The Idempotency-Key must be printable ASCII.'),
    new IdempotencyBodyUnreadableException(),
  ];
  const responses: Record<number, Record<string, unknown>> = {
    400: problemResponse(
      required
        ? 'Idempotency-Key missing or invalid (or the body cannot be fingerprinted).'
        : 'Idempotency-Key invalid (or the body cannot be fingerprinted).',
      badRequest,
    ),
    409: problemResponse(
      'A request with this Idempotency-Key is still in progress: retry after `Retry-After` seconds.',
      [new IdempotencyRequestInProgressException(retryAfterSeconds)],
      {
        'Retry-After': {
          ...RETRY_AFTER_HEADER['Retry-After'],
          // The route's `retryAfter`, which may be '0s'.
          schema: { type: 'integer', minimum: 0, example: retryAfterSeconds },
        },
      },
    ),
    503: problemResponse(
      'The idempotency store is unavailable; the operation did not run. Retry with the same key.',
      [new IdempotencyStoreUnavailableException()],
      RETRY_AFTER_HEADER,
    ),
  };
  if (keyReused)
    responses[422] = problemResponse(
      'This Idempotency-Key was already used with a different request (method, URL or body).',
      [new IdempotencyKeyReusedException()],
    );
  return responses;
}

function problemResponse(
  description: string,
  exceptions: IdempotencyException[],
  headers?: Record<string, unknown>,
): Record<string, unknown> {
  const problems = exceptions.map((exception) => exception.getResponse() as ProblemDetails);
  return {
    description,
    ...(headers ? { headers } : {}),
    content: {
      [PROBLEM_CONTENT_TYPE]: {
        schema: problemSchema(problems),
        examples: Object.fromEntries(
          problems.map((problem) => [
            problem.type.slice(problem.type.lastIndexOf(':') + 1),
            { summary: problem.title, value: problem },
          ]),
        ),
      },
    },
  };
}

/** RFC 9457 problem details, narrowed to the types and status this response can carry. */
function problemSchema(problems: ProblemDetails[]): Record<string, unknown> {
  return {
    type: 'object',
    description: 'RFC 9457 problem details.',
    required: ['type', 'title', 'status', 'detail'],
    properties: {
      type: {
        type: 'string',
        format: 'uri',
        description: 'Identifies the problem (a tag: URI, not meant to be fetched).',
        enum: problems.map((problem) => problem.type),
      },
      title: { type: 'string', description: 'Short summary of the problem type.' },
      status: { type: 'integer', enum: [problems[0].status] },
      detail: { type: 'string', description: 'What went wrong with this request.' },
    },
  };
}
