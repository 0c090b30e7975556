import { randomUUID } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';

/**
 * Checks an HTTP endpoint against the IETF draft "The Idempotency-Key HTTP Header Field"
 * (draft-ietf-httpapi-idempotency-key-header-06), from the outside: any server, any framework.
 * Each check sends real requests with fresh keys and names the draft's section it tests. Used by
 * the `nestjs-idempotency-check` command (cli.ts).
 */

export const DRAFT = 'draft-ietf-httpapi-idempotency-key-header-06';

export interface ConformanceOptions {
  /** The endpoint, e.g. `http://localhost:3000/payments`. */
  readonly url: string;
  /** Default `POST`. */
  readonly method?: string;
  /** A body the endpoint accepts (sent as JSON). Default `{}`. */
  readonly body?: unknown;
  /**
   * Another payload for the key-reuse check. Default: `body` with one more member
   * (`idempotencyCheck`), which changes the payload's fingerprint.
   */
  readonly otherBody?: unknown;
  /** Extra request headers (authentication, say), sent with every request. */
  readonly headers?: Readonly<Record<string, string>>;
  /** Requests sent at once in the concurrency check. Default 5. */
  readonly concurrency?: number;
  /** The endpoint documents the key as optional: skip the missing-key check. */
  readonly keyOptional?: boolean;
  /** Per request. Default 30 s. */
  readonly timeoutMs?: number;
}

export type CheckStatus = 'pass' | 'fail' | 'skip';

export interface CheckResult {
  readonly id: string;
  /** The draft's section, e.g. `2.7`. */
  readonly section: string;
  readonly title: string;
  readonly status: CheckStatus;
  /** What was seen, in a sentence. */
  readonly detail: string;
}

export interface ConformanceReport {
  readonly draft: string;
  readonly method: string;
  readonly url: string;
  readonly checks: readonly CheckResult[];
  readonly passed: boolean;
}

/** One answer as the checks compare them. */
interface Answer {
  readonly status: number;
  readonly contentType: string;
  readonly text: string;
  /** The body parsed as JSON, when it is JSON. */
  readonly json: unknown;
}

const PROBLEM_JSON = /^application\/problem\+json\b/i;

export async function checkConformance(options: ConformanceOptions): Promise<ConformanceReport> {
  const method = (options.method ?? 'POST').toUpperCase();
  const body = options.body ?? {};
  const otherBody = options.otherBody ?? withExtraMember(body);
  const send = (key: string | undefined, payload: unknown = body): Promise<Answer> =>
    request(options, method, key, payload);
  const checks: CheckResult[] = [];
  /** Every error answer, for the problem-details check. */
  const errors: { readonly what: string; readonly answer: Answer }[] = [];
  const check = (id: string, section: string, title: string, status: CheckStatus, detail: string) =>
    checks.push({ id, section, title, status, detail });

  // §2.6: the operation runs for a new key. Every other check builds on this one.
  const firstKey = randomUUID();
  const first = await send(firstKey);
  if (!isSuccess(first.status)) {
    check(
      'first-request',
      '2.6',
      'A request with a new key is processed',
      'fail',
      `got ${describe(first)}; pass a body the endpoint accepts (--body)`,
    );
    return report(options, method, checks);
  }
  check('first-request', '2.6', 'A request with a new key is processed', 'pass', `${first.status}`);

  // §2.6: a retry with the same key and payload gets the first response, without a second effect.
  const retry = await send(firstKey);
  const sameAnswer = retry.status === first.status && sameBody(retry, first);
  check(
    'replay',
    '2.6',
    'A retry with the same key and payload returns the first response',
    sameAnswer ? 'pass' : 'fail',
    sameAnswer
      ? `${retry.status}, the same body`
      : `first ${describe(first)}, retry ${describe(retry)}: the operation ran again or answered differently`,
  );

  // §2.7 (and §2.4, the fingerprint): the same key with another payload is refused with 422.
  const reused = await send(firstKey, otherBody);
  if (!isSuccess(reused.status)) errors.push({ what: 'key reuse', answer: reused });
  check(
    'key-reuse',
    '2.7',
    'Reusing a key with another payload is refused with 422',
    reused.status === 422 ? 'pass' : 'fail',
    reused.status === 422 ? '422' : `got ${describe(reused)}, expected 422`,
  );

  // §2.7: a required key that is missing is refused with 400.
  if (options.keyOptional) {
    check(
      'missing-key',
      '2.7',
      'A request without the key is refused with 400',
      'skip',
      'the key is optional here (--key-optional)',
    );
  } else {
    const missing = await send(undefined);
    if (!isSuccess(missing.status)) errors.push({ what: 'missing key', answer: missing });
    check(
      'missing-key',
      '2.7',
      'A request without the key is refused with 400',
      missing.status === 400 ? 'pass' : 'fail',
      missing.status === 400
        ? '400'
        : `got ${describe(missing)}, expected 400 (pass --key-optional if the key is optional)`,
    );
  }

  // §2.1: the field is an RFC 8941 String; a well-formed one works, a malformed one is refused.
  const quotedKey = randomUUID();
  const quoted = await send(`"${quotedKey}"`);
  const malformed = await send(`"${randomUUID()}`);
  if (!isSuccess(malformed.status)) errors.push({ what: 'malformed key', answer: malformed });
  const syntaxOk = isSuccess(quoted.status) && malformed.status === 400;
  check(
    'key-syntax',
    '2.1',
    'The key is a Structured Field String: well-formed accepted, malformed refused with 400',
    syntaxOk ? 'pass' : 'fail',
    `"key" got ${quoted.status}, an unterminated "key got ${malformed.status}` +
      (syntaxOk ? '' : ' (expected 2xx and 400)'),
  );

  // §2.7: duplicates sent while the first is being processed get 409 (or, from a server that
  // waits for the first, its response); never a second execution.
  const concurrentKey = randomUUID();
  const count = Math.max(2, options.concurrency ?? 5);
  const answers = await Promise.all(Array.from({ length: count }, () => send(concurrentKey)));
  const successes = answers.filter((answer) => isSuccess(answer.status));
  const conflicts = answers.filter((answer) => answer.status === 409);
  for (const answer of conflicts) errors.push({ what: 'concurrent duplicate', answer });
  const others = answers.filter((answer) => !isSuccess(answer.status) && answer.status !== 409);
  const oneOutcome = successes.every(
    (answer) => answer.status === successes[0].status && sameBody(answer, successes[0]),
  );
  const concurrentOk = successes.length > 0 && oneOutcome && others.length === 0;
  check(
    'concurrent',
    '2.7',
    'Concurrent duplicates get 409 (or the first response), never a second execution',
    concurrentOk ? 'pass' : 'fail',
    `${count} at once: ${successes.length} × ${successes[0]?.status ?? '2xx'}` +
      `${successes.length > 1 ? (oneOutcome ? ' (one response, replayed)' : ' with different bodies: it ran more than once') : ''}` +
      `, ${conflicts.length} × 409` +
      (others.length ? `, ${others.map((answer) => answer.status).join(', ')} unexpected` : ''),
  );

  // §2.7: its error examples are RFC 9457 problem details (application/problem+json).
  const notProblems = errors.filter(({ answer }) => !isProblem(answer));
  check(
    'problem-details',
    '2.7',
    'Error responses are RFC 9457 problem details (application/problem+json)',
    errors.length === 0 ? 'skip' : notProblems.length === 0 ? 'pass' : 'fail',
    errors.length === 0
      ? 'no error response to inspect'
      : notProblems.length === 0
        ? `${errors.length} error responses, each application/problem+json with a type or title`
        : notProblems
            .map(
              ({ what, answer }) =>
                `${what}: ${answer.status} ${answer.contentType || 'no content type'}`,
            )
            .join('; '),
  );

  return report(options, method, checks);
}

function report(
  options: ConformanceOptions,
  method: string,
  checks: readonly CheckResult[],
): ConformanceReport {
  return {
    draft: DRAFT,
    method,
    url: options.url,
    checks,
    passed: checks.every((check) => check.status !== 'fail'),
  };
}

async function request(
  options: ConformanceOptions,
  method: string,
  key: string | undefined,
  payload: unknown,
): Promise<Answer> {
  const headers: Record<string, string> = {
    'content-type': 'application/json',
    accept: 'application/json, application/problem+json',
    ...options.headers,
  };
  if (key !== undefined) headers['idempotency-key'] = key;
  const response = await fetch(options.url, {
    method,
    headers,
    body: method === 'GET' || method === 'HEAD' ? undefined : JSON.stringify(payload),
    signal: AbortSignal.timeout(options.timeoutMs ?? 30_000),
  });
  const text = await response.text();
  let json: unknown;
  try {
    json = text === '' ? undefined : JSON.parse(text);
  } catch {
    json = undefined;
  }
  return {
    status: response.status,
    contentType: response.headers.get('content-type') ?? '',
    text,
    json,
  };
}

function isSuccess(status: number): boolean {
  return status >= 200 && status < 300;
}

/** JSON bodies compare as values (member order aside); others byte for byte. */
function sameBody(a: Answer, b: Answer): boolean {
  return a.json !== undefined && b.json !== undefined
    ? isDeepStrictEqual(a.json, b.json)
    : a.text === b.text;
}

/** RFC 9457 §3: a JSON object; `status`, when present, the response's own; a `type` or a `title`. */
function isProblem(answer: Answer): boolean {
  if (!PROBLEM_JSON.test(answer.contentType)) return false;
  const problem = answer.json as Record<string, unknown> | undefined;
  if (!problem || typeof problem !== 'object' || Array.isArray(problem)) return false;
  if (problem.status !== undefined && problem.status !== answer.status) return false;
  return typeof problem.type === 'string' || typeof problem.title === 'string';
}

function describe(answer: Answer): string {
  const body = answer.text.length > 120 ? `${answer.text.slice(0, 117)}...` : answer.text;
  return `${answer.status}${body ? ` ${body}` : ''}`;
}

function withExtraMember(body: unknown): unknown {
  return body !== null && typeof body === 'object' && !Array.isArray(body)
    ? { ...body, idempotencyCheck: randomUUID() }
    : { value: body, idempotencyCheck: randomUUID() };
}
