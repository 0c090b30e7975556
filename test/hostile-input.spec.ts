import fc from 'fast-check';
import { randomUUID } from 'node:crypto';
import { IdempotencyRecord } from '../lib/index.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { eachTarget } from './support/databases.js';
import { buildRequest, rawRequest, type RawResponse } from './support/raw-http.js';
import { deleteRecordsOfRun, report, runTag, STACK_TRACE, tally } from './support/reliability.js';

/** Runs per property (each run: one to three requests on the wire). */
const RUNS = 120;
const MAX_RESPONSE_BYTES = 200_000;
const PROBLEM_TYPE = 'tag:nestjs-idempotency,2026:';
/** Node's default --max-http-header-size, for Express and Fastify alike. */
const NODE_MAX_HEADER_BYTES = 16_384;

// ---------------------------------------------------------------------------------------------
// An independent model of how a header value is read, from the specs rather than from lib/:
// Node's HTTP parser refuses control characters (HTAB aside) and strips leading and trailing
// SP/HTAB (RFC 9110 OWS); the module then wants printable ASCII, either a bare token or an
// RFC 8941 sf-string, 1–255 characters once unquoted.
// ---------------------------------------------------------------------------------------------

type Expected = { kind: 'refused-by-node' } | { kind: 'invalid' } | { kind: 'key'; key: string };

function expectedReading(values: readonly string[]): Expected {
  // Control characters on purpose: the ones Node refuses in a header value.
  // eslint-disable-next-line no-control-regex
  if (values.some((value) => /[\x00-\x08\x0a-\x1f\x7f]/.test(value)))
    return { kind: 'refused-by-node' };
  if (values.length !== 1) return { kind: 'invalid' };
  const value = values[0].replace(/^[ \t]+|[ \t]+$/g, '');
  if (!/^[\x20-\x7e]*$/.test(value)) return { kind: 'invalid' };
  let key = value;
  if (value.startsWith('"')) {
    const match = /^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$/.exec(value);
    if (!match) return { kind: 'invalid' };
    key = match[1].replace(/\\(["\\])/g, '$1');
  }
  if (key.length === 0 || key.length > 255) return { kind: 'invalid' };
  return { kind: 'key', key };
}

/** A `__proto__` key, or a `constructor` key holding a `prototype` key, at any depth. */
function hasPoisoningKey(value: unknown): boolean {
  if (value === null || typeof value !== 'object') return false;
  if (!Array.isArray(value)) {
    if (Object.hasOwn(value, '__proto__')) return true;
    const constructor = Object.hasOwn(value, 'constructor')
      ? (value as Record<string, unknown>).constructor
      : undefined;
    if (
      constructor !== null &&
      typeof constructor === 'object' &&
      Object.hasOwn(constructor, 'prototype')
    )
      return true;
  }
  return Object.values(value).some(hasPoisoningKey);
}

/** The sf-string form of a key: the same key as its bare form. */
const quoted = (key: string) => `"${key.replace(/[\\"]/g, (c) => `\\${c}`)}"`;

const char = (min: number, max: number) =>
  fc.integer({ min, max }).map((code) => String.fromCharCode(code));
const printable = char(0x20, 0x7e);
const tokenChar = char(0x21, 0x7e);
const controlChar = fc.oneof(
  char(0x00, 0x08),
  char(0x0b, 0x0c),
  char(0x0e, 0x1f),
  fc.constant('\x7f'),
);
const highByte = char(0x80, 0xff); // obs-text: Node lets it through, decoded as latin-1

/** Header values as latin-1 strings (one char = one byte on the wire); never CR or LF. */
const headerValue = fc.oneof(
  fc.string({ unit: tokenChar, minLength: 1, maxLength: 60 }),
  fc.string({ unit: printable, maxLength: 300 }),
  fc.integer({ min: 250, max: 260 }).map((n) => 'k'.repeat(n)),
  fc.integer({ min: 256, max: 10_240 }).map((n) => 'x'.repeat(n)),
  fc.constantFrom(
    '',
    ' ',
    '\t',
    '   ',
    '""',
    '"',
    '"\\"',
    '"a"b',
    '"a\\b"',
    '"a',
    'a"',
    '\\',
    '"\\\\"',
    '"\\""',
  ),
  fc
    .tuple(
      fc.string({
        unit: fc.oneof(printable, fc.constantFrom('\\"', '\\\\', '\\', '"')),
        maxLength: 40,
      }),
      fc.constantFrom('', '', '', 'x', ' ', '"', ';a=1'),
    )
    .map(([content, after]) => `"${content}"${after}`),
  fc.string({
    unit: fc.oneof(
      { weight: 5, arbitrary: printable },
      controlChar,
      highByte,
      fc.constant('\t'),
      fc.constant('\xa0'),
    ),
    minLength: 1,
    maxLength: 40,
  }),
  fc
    .string({ unit: 'grapheme', minLength: 1, maxLength: 20 })
    .map((s) => Buffer.from(s, 'utf8').toString('latin1')),
  fc
    .tuple(
      fc.constantFrom(' ', '\t', '  \t'),
      fc.string({ unit: tokenChar, minLength: 1, maxLength: 20 }),
      fc.constantFrom('', ' ', '\t'),
    )
    .map(([a, b, c]) => a + b + c),
);
const headerName = fc.constantFrom(
  'Idempotency-Key',
  'idempotency-key',
  'IDEMPOTENCY-KEY',
  'iDeMpOtEnCy-KeY',
);

/** A JSON value with unicode strings, and the same value written with its object keys reversed. */
const jsonValue = fc.jsonValue({ maxDepth: 6, stringUnit: 'grapheme' });
function reorderedJson(value: unknown): string {
  return JSON.stringify(value, (_key, nested: unknown) =>
    nested !== null && typeof nested === 'object' && !Array.isArray(nested)
      ? Object.fromEntries(Object.entries(nested as object).reverse())
      : nested,
  );
}

const CONTENT_TYPES = [
  'application/json',
  'application/json; charset=utf-8',
  'application/json; charset=utf-16',
  'application/json; charset=klingon',
  'text/plain',
  'application/octet-stream',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=x',
  'application/xml',
  undefined,
] as const;

/** Request bodies nobody planned for, with the content type they are sent as. */
const hostileBody = fc.oneof(
  fc
    .tuple(
      fc.integer({ min: 1, max: 40_000 }),
      fc.constantFrom(['[', ']'], ['{"a":', '}'], ['[{"b":', '}]']),
    )
    .map(([depth, [open, close]]) => ({
      what: 'deep',
      contentType: 'application/json' as string | undefined,
      body: Buffer.from(open.repeat(depth) + (open === '[' ? '' : '0') + close.repeat(depth)),
    })),
  fc.integer({ min: 10_000, max: 1_200_000 }).map((size) => ({
    what: 'large',
    contentType: 'application/json' as string | undefined,
    body: Buffer.from(JSON.stringify({ pad: 'p'.repeat(size) })),
  })),
  fc
    .tuple(fc.uint8Array({ maxLength: 3000 }), fc.constantFrom(...CONTENT_TYPES))
    .map(([bytes, contentType]) => ({
      what: 'bytes',
      contentType: contentType as string | undefined,
      body: Buffer.from(bytes),
    })),
  fc
    .tuple(fc.string({ unit: 'grapheme', maxLength: 500 }), fc.constantFrom(...CONTENT_TYPES))
    .map(([text, contentType]) => ({
      what: 'text',
      contentType: contentType as string | undefined,
      body: Buffer.from(text),
    })),
  fc.tuple(fc.json({ maxDepth: 4 }), fc.integer({ min: 0, max: 10 })).map(([json, cut]) => ({
    what: 'truncated json',
    contentType: 'application/json' as string | undefined,
    body: Buffer.from(json.slice(0, Math.max(0, json.length - cut))),
  })),
);

describe.each(eachTarget)('hostile input on %s', (_name, { database, platform }) => {
  const tag = runTag('hostile');
  let fixture: ReliabilityApp;
  const outcomes: Record<string, string[]> = { keys: [], bodies: [], json: [] };

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      // Every property run is its own caller, so generated keys never collide between runs.
      {
        scope: (request) => `${tag}:${String(request.headers['x-run'] ?? '')}`,
        maxResponseBytes: MAX_RESPONSE_BYTES,
      },
      { platform },
    );
  });
  afterAll(async () => {
    if (fixture) {
      await deleteRecordsOfRun(fixture.dataSource, tag);
      await fixture.close();
    }
  });

  const recordsOfRun = (run: string) =>
    fixture.dataSource.getRepository(IdempotencyRecord).findBy({ scope: `${tag}:${run}` });

  /** Never a 5xx, never a stack trace; the module's own answers are problem+json. */
  function expectSane(response: RawResponse) {
    expect(response.status).toBeGreaterThanOrEqual(200);
    expect(response.status).toBeLessThan(500);
    expect(response.text).not.toMatch(STACK_TRACE);
    if (/^application\/problem\+json/.test(response.headers['content-type'] ?? '')) {
      const problem = JSON.parse(response.text);
      expect(problem.type.startsWith(PROBLEM_TYPE)).toBe(true);
      expect(problem.status).toBe(response.status);
    }
  }

  const problemType = (response: RawResponse) =>
    /^application\/problem\+json/.test(response.headers['content-type'] ?? '')
      ? JSON.parse(response.text).type.slice(PROBLEM_TYPE.length)
      : undefined;

  it('reads any Idempotency-Key header as the specs say: a key (201, then replays), or a 400, never a 5xx', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(headerName, headerValue), { minLength: 1, maxLength: 3 }),
        fc.boolean(),
        async (fields, once) => {
          const lines = once ? fields.slice(0, 1) : fields;
          const run = randomUUID();
          const send = (headerLines: (readonly [string, string])[]) =>
            rawRequest(
              fixture.port,
              buildRequest(
                'POST',
                '/r/ok',
                [['Content-Type', 'application/json'], ['X-Run', run], ...headerLines],
                '{}',
              ),
            );
          const expected = expectedReading(lines.map(([, value]) => value));
          const response = await send(lines);
          expectSane(response);
          const headerBytes = lines.reduce(
            (size, [name, value]) => size + name.length + value.length + 4,
            0,
          );
          const nearLimit = Math.abs(headerBytes - NODE_MAX_HEADER_BYTES) <= 500;
          if (headerBytes > NODE_MAX_HEADER_BYTES + 500 || (nearLimit && response.status === 431)) {
            // Past Node's 16 KiB header limit: 431 from the HTTP server, before the app. Within a few
            // hundred bytes of it either side, the other header lines and how Node counts them decide
            // (a soak run met 16,385 bytes of key lines let through), so either answer is right there.
            expect(response.status).toBe(431);
            outcomes.keys.push('431 from the HTTP server (headers over 16 KiB)');
            expect(await recordsOfRun(run)).toEqual([]);
            return;
          }
          outcomes.keys.push(
            expected.kind === 'key'
              ? String(response.status)
              : `${response.status} ${problemType(response) ?? 'from the HTTP server'}`,
          );
          if (expected.kind === 'key') {
            expect(response.status).toBe(201);
            expect(response.headers['idempotent-replayed']).toBeUndefined();
            // The same key, sent again (as an sf-string this time), replays.
            const retry = await send([['Idempotency-Key', quoted(expected.key)]]);
            expect(retry.status).toBe(201);
            expect(retry.headers['idempotent-replayed']).toBe('true');
            expect(retry.text).toBe(response.text);
            const records = await recordsOfRun(run);
            expect(records.map((r) => [r.key, r.state, r.responseStatus])).toEqual([
              [expected.key, 'completed', 201],
            ]);
          } else {
            expect(response.status).toBe(400);
            if (expected.kind === 'invalid') expect(problemType(response)).toBe('key-invalid');
            // Refused by Node's parser before the app: no problem body, and certainly no record.
            else expect(problemType(response)).toBeUndefined();
            expect(await recordsOfRun(run)).toEqual([]);
          }
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('stores and replays any JSON body exactly, whatever its key order on retry', async () => {
    await fc.assert(
      fc.asyncProperty(jsonValue, async (value) => {
        const run = randomUUID();
        const key = randomUUID();
        const send = (body: string) =>
          rawRequest(
            fixture.port,
            buildRequest(
              'POST',
              '/r/echo',
              [
                ['Content-Type', 'application/json'],
                ['X-Run', run],
                ['Idempotency-Key', key],
              ],
              body,
            ),
          );
        const first = await send(JSON.stringify(value));
        expectSane(first);
        outcomes.json.push(String(first.status));
        if (first.status !== 201) {
          // Express parses objects and arrays only (strict JSON): a bare value is the platform's 400.
          // Fastify refuses a "__proto__" key, or "constructor" holding "prototype", anywhere in the
          // body (prototype poisoning: its default onProtoPoisoning and onConstructorPoisoning).
          const refusedByPlatform =
            platform === 'express'
              ? typeof value !== 'object' || value === null
              : hasPoisoningKey(value);
          expect([platform, first.status, refusedByPlatform]).toEqual([platform, 400, true]);
          expect(fixture.calls.count('echo', key)).toBe(0);
          expect(await recordsOfRun(run)).toEqual([]);
          return;
        }
        expect(JSON.parse(first.text).received).toEqual(JSON.parse(JSON.stringify(value)));
        const retry = await send(reorderedJson(value));
        expect(retry.status).toBe(201);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(JSON.parse(retry.text)).toEqual(JSON.parse(first.text));
        expect(fixture.calls.count('echo', key)).toBe(1);
        const records = await recordsOfRun(run);
        expect(records.map((r) => r.state)).toEqual(['completed']);
      }),
      { numRuns: RUNS },
    );
  });

  it('answers hostile bodies (deep, large, binary, wrong content type, truncated) with a 4xx or a normal response, never a 5xx', async () => {
    await fc.assert(
      fc.asyncProperty(hostileBody, async ({ what, contentType, body }) => {
        const run = randomUUID();
        const key = randomUUID();
        const send = () =>
          rawRequest(
            fixture.port,
            buildRequest(
              'POST',
              '/r/echo',
              [
                ...(contentType ? [['Content-Type', contentType] as const] : []),
                ['X-Run', run],
                ['Idempotency-Key', key],
              ],
              body,
            ),
          );
        const first = await send();
        expectSane(first);
        outcomes.bodies.push(
          `${what}: ${first.status}${problemType(first) ? ` ${problemType(first)}` : ''}`,
        );
        const records = await recordsOfRun(run);
        if (first.status >= 400) {
          // Refused before or by the module: the handler did not run, no record is left.
          expect(fixture.calls.count('echo', key)).toBe(0);
          expect(records).toEqual([]);
          return;
        }
        expect(first.status).toBe(201);
        const retry = await send();
        if (Buffer.byteLength(first.text) > MAX_RESPONSE_BYTES) {
          // Too large to store: sent, key released, so the retry runs again (documented).
          expect(records).toEqual([]);
          expect(retry.headers['idempotent-replayed']).toBeUndefined();
          expect(fixture.calls.count('echo', key)).toBe(2);
        } else {
          expect(records.map((r) => r.state)).toEqual(['completed']);
          expect(retry.status).toBe(201);
          expect(retry.headers['idempotent-replayed']).toBe('true');
          expect(retry.text).toBe(first.text);
          expect(fixture.calls.count('echo', key)).toBe(1);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('leaves no half-written record: every row of the runs above is completed with a response', async () => {
    // The query builder rather than raw SQL: parameter syntax differs between the databases.
    const rows: { state: string; response_status: number | null; count: string }[] =
      await fixture.dataSource
        .getRepository(IdempotencyRecord)
        .createQueryBuilder('record')
        .select('record.state', 'state')
        .addSelect('record.responseStatus', 'response_status')
        .addSelect('COUNT(*)', 'count')
        .where('record.scope LIKE :prefix', { prefix: `${tag}:%` })
        .groupBy('record.state')
        .addGroupBy('record.responseStatus')
        .getRawMany();
    expect(rows.filter((row) => row.state !== 'completed' || row.response_status === null)).toEqual(
      [],
    );
    report(`hostile input on ${_name} (${RUNS} runs per property)`, {
      'Idempotency-Key values': JSON.stringify(tally(outcomes.keys)),
      'JSON bodies': JSON.stringify(tally(outcomes.json)),
      'hostile bodies': JSON.stringify(
        tally(outcomes.bodies.map((o) => o.replace(/^(\w+( \w+)?): /, ''))),
      ),
      'records left, by state': JSON.stringify(
        Object.fromEntries(
          rows.map((row) => [`${row.state} ${row.response_status}`, Number(row.count)]),
        ),
      ),
      '5xx': 0,
    });
  });
});
