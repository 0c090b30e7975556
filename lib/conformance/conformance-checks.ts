import { randomUUID } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';

/**
 * Checks an HTTP endpoint against the IETF draft "The Idempotency-Key HTTP Header Field"
 * (draft-ietf-httpapi-idempotency-key-header-06), from the outside: any server, any framework.
 * Each check sends real requests with fresh keys and names the draft's section it tests. Used by
 * the `nestjs-idempotency-check` command (cli.ts).
 */

/** The draft the checks follow, named in every report: `draft-ietf-httpapi-idempotency-key-header-06`. */
export const DRAFT = 'draft-ietf-httpapi-idempotency-key-header-06';

/** What to check: the endpoint, the request it accepts, and how to send it. */
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
  /**
   * Extra request headers (authentication, say), sent with every request. They replace the
   * checker's own `Content-Type: application/json` and `Accept`, whatever their case.
   */
  readonly headers?: Readonly<Record<string, string>>;
  /** Requests sent at once in the concurrency check: a whole number, at least 2. Default 5. */
  readonly concurrency?: number;
  /** The endpoint documents the key as optional: skip the missing-key check. */
  readonly keyOptional?: boolean;
  /**
   * Per request, in ms. Default 30 s. A request that gets no answer in time fails its check; the
   * other checks still run.
   */
  readonly timeoutMs?: number;
}

/** A check's verdict: `skip` when it cannot tell (e.g. a replay that looks like a new execution). */
export type CheckStatus = 'pass' | 'fail' | 'skip';

/** One check of the report. */
export interface CheckResult {
  /** A stable identifier of the check, for scripts reading `--json`. */
  readonly id: string;
  /** The draft's section, e.g. `2.7`. */
  readonly section: string;
  /** What the check expects, in a sentence. */
  readonly title: string;
  /** Its verdict. */
  readonly status: CheckStatus;
  /** What was seen, in a sentence. */
  readonly detail: string;
}

/** What `checkConformance` found. */
export interface ConformanceReport {
  /** The draft checked against ({@link DRAFT}). */
  readonly draft: string;
  /** The method the checks sent. */
  readonly method: string;
  /** The endpoint checked. */
  readonly url: string;
  /** Every check, in the order run. */
  readonly checks: readonly CheckResult[];
  /** No check failed (skipped ones do not count against it). */
  readonly passed: boolean;
}

/** One answer as the checks compare them. */
interface Answer {
  /** 0: no answer (timed out, connection lost); `failure` says why. */
  readonly status: number;
  readonly contentType: string;
  /** A created resource's address tells executions apart, as its body does. */
  readonly location: string;
  readonly text: string;
  /** The body parsed as JSON, when it is JSON. */
  readonly json: unknown;
  readonly failure?: {
    readonly error: unknown;
    readonly timedOut: boolean;
    readonly description: string;
  };
}

const PROBLEM_JSON = /^application\/problem\+json\b/i;

/**
 * Runs the checks. Rejects with a `TypeError` or `RangeError` for options it cannot use (a bad URL,
 * method, header or number), and with the network error when the endpoint cannot be reached at
 * all; once it answered, a request that gets no answer (timeout, lost connection) fails its check
 * and the others still run.
 */
export async function checkConformance(options: ConformanceOptions): Promise<ConformanceReport> {
  const method = (options.method ?? 'POST').toUpperCase();
  const count = options.concurrency ?? 5;
  if (!Number.isInteger(count) || count < 2) {
    throw new RangeError(`concurrency must be a whole number of 2 or more; got ${count}`);
  }
  const timeoutMs = options.timeoutMs ?? 30_000;
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw new RangeError(`timeoutMs must be a positive number of ms; got ${timeoutMs}`);
  }
  // The options' headers replace the checker's own, whatever their case (a PATCH endpoint's
  // `Content-Type: application/merge-patch+json`, say). A bad method, header or URL throws here.
  const baseHeaders = new Headers({
    'content-type': 'application/json',
    accept: 'application/json, application/problem+json',
  });
  for (const [name, value] of Object.entries(options.headers ?? {})) baseHeaders.set(name, value);
  new Request(options.url, { method, headers: baseHeaders });

  const body = options.body ?? {};
  const otherBody = options.otherBody ?? withExtraMember(body);
  // §2.1: the field's value is an RFC 8941 String, `"key"`; most servers take a bare key too. The
  // checks send the draft's form, unless the endpoint only takes bare keys (then the syntax check
  // fails and the others still run).
  let quote = true;
  const keyField = (key: string) => (quote ? `"${key}"` : key);
  const send = (key: string | undefined, payload: unknown = body): Promise<Answer> =>
    request(options.url, method, baseHeaders, timeoutMs, key && keyField(key), payload);
  const checks: CheckResult[] = [];
  /** Every error answer, for the problem-details check. */
  const errors: { readonly what: string; readonly answer: Answer }[] = [];
  const noteError = (what: string, answer: Answer) => {
    if (answer.status !== 0 && !isSuccess(answer.status)) errors.push({ what, answer });
  };
  const check = (id: string, section: string, title: string, status: CheckStatus, detail: string) =>
    checks.push({ id, section, title, status, detail });

  // §2.6: the operation runs for a new key. Every other check builds on this one.
  let firstKey = randomUUID();
  let first = await send(firstKey);
  if (first.failure && !first.failure.timedOut) throw first.failure.error; // not reachable at all
  const quotedAnswer = first;
  if (first.status === 400) {
    // Perhaps the quoted form is what it refuses: try a bare key.
    quote = false;
    const bareKey = randomUUID();
    const bare = await send(bareKey);
    if (isSuccess(bare.status)) [first, firstKey] = [bare, bareKey];
    else quote = true;
  }
  if (!isSuccess(first.status)) {
    const hint =
      first.status === 401 || first.status === 403
        ? "pass the credentials it needs (-H 'Authorization: …')"
        : first.status === 0
          ? 'is it running, and is --timeout long enough?'
          : 'pass a body the endpoint accepts (--body)';
    check(
      'first-request',
      '2.6',
      'A request with a new key is processed',
      'fail',
      `got ${describe(first)}; ${hint}`,
    );
    return report(options, method, checks);
  }
  check('first-request', '2.6', 'A request with a new key is processed', 'pass', `${first.status}`);

  // §2.6: a retry with the same key and payload gets the first response, without a second effect.
  // Only a response that differs from one execution to the next (an id, a Location) tells a replay
  // from a second execution: another new key shows whether this endpoint's do.
  const control = await send(randomUUID());
  const tellsExecutionsApart = isSuccess(control.status) && !sameAnswer(control, first);
  const indistinct =
    `${isSuccess(control.status) ? 'a new key got the same response' : `a new key got ${describe(control)}`}, ` +
    'so a second execution cannot be told from a replay from the outside: check the side effect yourself';
  const retry = await send(firstKey);
  const sameAsFirst = sameAnswer(retry, first);
  check(
    'replay',
    '2.6',
    'A retry with the same key and payload returns the first response',
    !sameAsFirst ? 'fail' : tellsExecutionsApart ? 'pass' : 'skip',
    !sameAsFirst
      ? `first ${describe(first)}, retry ${describe(retry)}` +
          (retry.failure ? '' : ': the operation ran again or answered differently')
      : tellsExecutionsApart
        ? `${retry.status}, the same body`
        : `${retry.status}, the same body; but ${indistinct}`,
  );

  // §2.7 (and §2.4, the fingerprint): the same key with another payload is refused with 422. That
  // 422 is about the key only if the other payload, with a new key, is accepted.
  const reused = await send(firstKey, otherBody);
  noteError('key reuse', reused);
  const otherAlone = reused.status === 422 ? await send(randomUUID(), otherBody) : undefined;
  if (otherAlone) noteError('the other payload with a new key', otherAlone);
  check(
    'key-reuse',
    '2.7',
    'Reusing a key with another payload is refused with 422',
    reused.status === 422 && otherAlone && isSuccess(otherAlone.status) ? 'pass' : 'fail',
    reused.status !== 422
      ? `got ${describe(reused)}, expected 422`
      : otherAlone && isSuccess(otherAlone.status)
        ? '422'
        : `422, but the other payload with a new key got ${describe(otherAlone!)}: pass --other-body with another payload the endpoint accepts`,
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
    noteError('missing key', missing);
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

  // §2.1: the field is an RFC 8941 String; a well-formed one works (the first request's, unless the
  // endpoint only took a bare key), a malformed one is refused.
  const unterminated = await request(
    options.url,
    method,
    baseHeaders,
    timeoutMs,
    `"${randomUUID()}`,
    body,
  );
  noteError('malformed key', unterminated);
  const syntaxOk = quote && unterminated.status === 400;
  check(
    'key-syntax',
    '2.1',
    'The key is a Structured Field String: well-formed accepted, malformed refused with 400',
    syntaxOk ? 'pass' : 'fail',
    `"key" got ${describeStatus(quotedAnswer)}${quote ? '' : ` (a bare key got ${first.status})`}, ` +
      `an unterminated "key got ${describeStatus(unterminated)}` +
      (syntaxOk ? '' : ' (expected 2xx and 400)'),
  );

  // §2.7: duplicates sent while the first is being processed get 409 (or, from a server that
  // waits for the first, its response); never a second execution.
  const concurrentKey = randomUUID();
  const answers = await Promise.all(Array.from({ length: count }, () => send(concurrentKey)));
  const successes = answers.filter((answer) => isSuccess(answer.status));
  const conflicts = answers.filter((answer) => answer.status === 409);
  for (const answer of conflicts) noteError('concurrent duplicate', answer);
  const others = answers.filter((answer) => !isSuccess(answer.status) && answer.status !== 409);
  const oneOutcome = successes.every((answer) => sameAnswer(answer, successes[0]));
  const concurrentOk = successes.length > 0 && oneOutcome && others.length === 0;
  const unexpected = new Map<string, number>();
  for (const answer of others) {
    const what = describeStatus(answer);
    unexpected.set(what, (unexpected.get(what) ?? 0) + 1);
  }
  check(
    'concurrent',
    '2.7',
    'Concurrent duplicates get 409 (or the first response), never a second execution',
    !concurrentOk ? 'fail' : successes.length > 1 && !tellsExecutionsApart ? 'skip' : 'pass',
    `${count} at once: ${successes.length} × ${successes[0]?.status ?? '2xx'}` +
      `${successes.length > 1 ? (oneOutcome ? (tellsExecutionsApart ? ' (one response, replayed)' : ' (alike)') : ' with different bodies: it ran more than once') : ''}` +
      `, ${conflicts.length} × 409` +
      [...unexpected].map(([what, times]) => `, ${times} × ${what} unexpected`).join('') +
      (concurrentOk && successes.length > 1 && !tellsExecutionsApart ? `; but ${indistinct}` : ''),
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

/** One request; no answer (timeout, lost connection) is an answer of status 0, not a throw. */
async function request(
  url: string,
  method: string,
  baseHeaders: Headers,
  timeoutMs: number,
  keyField: string | undefined,
  payload: unknown,
): Promise<Answer> {
  const headers = new Headers(baseHeaders);
  if (keyField === undefined) headers.delete('idempotency-key');
  else headers.set('idempotency-key', keyField);
  try {
    const response = await fetch(url, {
      method,
      headers,
      body: method === 'GET' || method === 'HEAD' ? undefined : JSON.stringify(payload),
      signal: AbortSignal.timeout(timeoutMs),
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
      location: response.headers.get('location') ?? '',
      text,
      json,
    };
  } catch (error) {
    const timedOut = (error as Error).name === 'TimeoutError';
    const cause = (error as { cause?: { message?: string } }).cause?.message;
    const description = timedOut
      ? `timed out after ${timeoutMs} ms`
      : `${(error as Error).message}${cause ? ` (${cause})` : ''}`;
    return {
      status: 0,
      contentType: '',
      location: '',
      text: '',
      json: undefined,
      failure: { error, timedOut, description },
    };
  }
}

function isSuccess(status: number): boolean {
  return status >= 200 && status < 300;
}

/**
 * The same status, Location and body. JSON bodies compare as values (member order aside); others
 * byte for byte.
 */
function sameAnswer(a: Answer, b: Answer): boolean {
  if (a.status !== b.status || a.location !== b.location) return false;
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

function describeStatus(answer: Answer): string {
  return answer.failure ? `no answer (${answer.failure.description})` : `${answer.status}`;
}

function describe(answer: Answer): string {
  if (answer.failure) return describeStatus(answer);
  const body = answer.text.length > 120 ? `${answer.text.slice(0, 117)}...` : answer.text;
  return `${answer.status}${body ? ` ${body}` : ''}`;
}

function withExtraMember(body: unknown): unknown {
  return body !== null && typeof body === 'object' && !Array.isArray(body)
    ? { ...body, idempotencyCheck: randomUUID() }
    : { value: body, idempotencyCheck: randomUUID() };
}
