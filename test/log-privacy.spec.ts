import { randomUUID } from 'node:crypto';
import type { DataSource } from 'typeorm';
import { IdempotencyRecord } from '../lib/index.js';
import { truncateKeyForLog } from '../lib/utils/idempotency-key.js';
import { waitUntilPast } from './fixtures/fixture-app.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { eachTarget } from './support/databases.js';
import { CapturedLog } from './support/captured-log.js';
import { post } from './support/http.js';
import { deleteRecordsOfRun, report, runTag, tally } from './support/reliability.js';

/**
 * Makes the store refuse writes of two scopes: claims in `<tag>:refuse-claim` (so the claim fails:
 * 503) and completions in `<tag>:refuse-complete` (so storing the response fails after the handler
 * ran). Real database errors, through each database's own mechanism; other rows are untouched.
 */
async function refuseWrites(dataSource: DataSource, tag: string): Promise<() => Promise<void>> {
  const claimScope = `${tag}:refuse-claim`;
  const completeScope = `${tag}:refuse-complete`;
  const type = dataSource.options.type;
  if (type === 'better-sqlite3') {
    await dataSource.query(
      `CREATE TRIGGER ${tag}_claim BEFORE INSERT ON idempotency_records WHEN NEW.scope = '${claimScope}' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END`,
    );
    await dataSource.query(
      `CREATE TRIGGER ${tag}_complete BEFORE UPDATE ON idempotency_records WHEN NEW.scope = '${completeScope}' AND NEW.state = 'completed' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END`,
    );
    return async () => {
      await dataSource.query(`DROP TRIGGER ${tag}_claim`);
      await dataSource.query(`DROP TRIGGER ${tag}_complete`);
    };
  }
  const check = `scope <> '${claimScope}' AND (scope <> '${completeScope}' OR state <> 'completed')`;
  // NOT VALID (PostgreSQL): existing rows of other tests are not re-checked, only new writes.
  await dataSource.query(
    `ALTER TABLE idempotency_records ADD CONSTRAINT ${tag}_refuse CHECK (${check})${type === 'postgres' ? ' NOT VALID' : ''}`,
  );
  return async () =>
    void (await dataSource.query(`ALTER TABLE idempotency_records DROP CONSTRAINT ${tag}_refuse`));
}

describe.each(eachTarget)('log lines on %s', (name, { database, platform }) => {
  const tag = runTag('logs');
  const log = new CapturedLog();
  /** What must never appear in a log line: the part of each key past its truncation, each body. */
  const secrets = new Set<string>();
  let fixture: ReliabilityApp;
  let allowWrites: () => Promise<void> = async () => undefined;
  /** Where the current test's lines start. */
  let mark = 0;
  beforeEach(() => (mark = log.lines.length));

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      {
        maxResponseBytes: 10_000, // /r/big answers 20 kB
        scope: (request) => `${tag}:${String(request.headers['x-case'] ?? '')}`,
      },
      { platform, logger: log },
    );
    allowWrites = await refuseWrites(fixture.dataSource, tag);
  });
  afterAll(async () => {
    if (!fixture) return;
    await allowWrites();
    await deleteRecordsOfRun(fixture.dataSource, tag);
    await fixture.close();
  });

  /**
   * A key whose truncated form may be logged and whose whole must not be (nor, for a long key,
   * anything past its first 8 characters). Short keys are wrapped in ~ and ^, which no other log
   * line holds, so finding one is a leak and not a coincidence.
   */
  const newKey = (length = 44) => {
    const random = `${randomUUID()}${randomUUID()}`.replace(/-/g, '');
    const key = length > 8 ? `K${random}`.slice(0, length) : `~${random.slice(0, length - 2)}^`;
    secrets.add(key);
    if (key.length > 8) secrets.add(key.slice(8));
    return key;
  };
  /** A request body carrying a marker that must never be logged (the handlers echo it back). */
  const newBody = () => {
    const secret = `BODY-${randomUUID()}`;
    secrets.add(secret);
    return { secret, card: '4242 4242 4242 4242' };
  };
  const send = (path: string, testCase: string, key: string, body: object) =>
    post(fixture.baseUrl, path, key, body).set('X-Case', testCase);
  /** Keeps what a response carried (its ids, the echoed marker): never to be logged either. */
  const remember = (response: { body: unknown; text?: string }) => {
    const id =
      (response.body as { id?: unknown })?.id ?? /"id":"([^"]+)"/.exec(response.text ?? '')?.[1];
    if (typeof id === 'string') secrets.add(id);
  };

  /** The current test's lines from the module (context Idempotency) that contain `phrase`. */
  const moduleLines = (phrase: string) =>
    log.lines
      .slice(mark)
      .filter((line) => line.context === 'Idempotency' && line.text.includes(phrase));

  /**
   * No line of the current test (or with `all`, of the whole run), of any level or context, holds
   * a key past its truncated form or any body.
   */
  function expectNothingLeaked({ all = false } = {}) {
    const lines = all ? log.lines : log.lines.slice(mark);
    const leaks = lines.filter((line) => [...secrets].some((secret) => line.text.includes(secret)));
    expect(leaks).toEqual([]);
  }

  it('logs nothing about keys on the ordinary paths: first run, replay, 422, 409', async () => {
    const key = newKey();
    const body = newBody();
    remember(await send('/r/echo', 'ordinary', key, body).expect(201));
    await send('/r/echo', 'ordinary', key, body).expect(201);
    await send('/r/echo', 'ordinary', key, newBody()).expect(422);
    const heldKey = newKey();
    fixture.gate.hold(heldKey);
    const heldBody = newBody();
    const held = send('/r/held', 'ordinary', heldKey, heldBody).then((r) => r);
    await fixture.gate.arrived(heldKey);
    await send('/r/held', 'ordinary', heldKey, heldBody).expect(409);
    fixture.gate.open(heldKey);
    remember(await held);
    expect(moduleLines('key')).toEqual([]);
    expectNothingLeaked();
  });

  it('a handler that crashes (500, key released): Nest logs the error, without the key or the body', async () => {
    const key = newKey();
    await send('/r/crash', 'crash', key, newBody()).expect(500);
    expect(
      log.lines.some((line) => line.level === 'error' && line.text.includes('handler crashed')),
    ).toBe(true);
    expectNothingLeaked();
  });

  it('the claim fails in the database (503): the error names the key truncated', async () => {
    const key = newKey();
    const response = await send('/r/echo', 'refuse-claim', key, newBody()).expect(503);
    expect(fixture.calls.count('echo', key)).toBe(0);
    expect(response.body.type).toBe('tag:nestjs-idempotency,2026:store-unavailable');
    const [line] = moduleLines('Idempotency store unavailable');
    expect(line?.level).toBe('error');
    expect(line.text).toContain(`key ${truncateKeyForLog(key)}`);
    expectNothingLeaked();
  });

  it('storing the response fails after the handler ran: the error names the key truncated', async () => {
    const key = newKey();
    remember(await send('/r/echo', 'refuse-complete', key, newBody()).expect(201));
    const [line] = moduleLines('Could not store the response');
    expect(line?.level).toBe('error');
    expect(line.text).toContain(`key ${truncateKeyForLog(key)} on POST /r/echo`);
    expectNothingLeaked();
  });

  it('a stale lock taken over: the first run, finishing late, warns with the key truncated', async () => {
    const key = newKey();
    const body = newBody();
    fixture.gate.hold(key);
    const first = send('/r/held-short-lock', 'takeover', key, body).then((r) => r);
    await fixture.gate.arrived(key);
    const [record] = await fixture.dataSource.getRepository(IdempotencyRecord).findBy({ key });
    await waitUntilPast(record.expiresAt);
    remember(await send('/r/held-short-lock', 'takeover', key, body).expect(201));
    fixture.gate.open(key);
    remember(await first);
    expect(fixture.calls.count('held-short-lock', key)).toBe(2);
    const [line] = moduleLines('was taken over');
    expect(line?.level).toBe('warn');
    expect(line.text).toContain(`Key ${truncateKeyForLog(key)} on POST /r/held-short-lock`);
    expectNothingLeaked();
  });

  it.each([
    ['a long key', 44],
    ['an 8-character key', 8],
    ['a 3-character key', 3],
  ])(
    'a response over maxResponseBytes, with %s: the warning holds neither the key nor the response',
    async (_what, length) => {
      const key = newKey(length);
      const response = await send('/r/big', `big-${length}`, key, newBody()).expect(201);
      remember(response);
      const line = moduleLines('over maxResponseBytes').find((l) =>
        l.text.includes(`for key ${truncateKeyForLog(key)} on`),
      );
      expect(line?.level).toBe('warn');
      expectNothingLeaked();
    },
  );

  it('a StreamableFile: the error names the key truncated, not the stream', async () => {
    const key = newKey();
    const response = await send('/r/file', 'file', key, newBody()).expect(201);
    remember(response);
    const [line] = moduleLines('A StreamableFile cannot be stored');
    expect(line?.level).toBe('error');
    expect(line.text).toContain(`key ${truncateKeyForLog(key)} on POST /r/file`);
    expectNothingLeaked();
  });

  // The purge deletes every expired row of the table, other specs' too: on a database server they
  // share, it could take rows another spec is about to purge and count, so it runs on the embedded ones.
  const onEmbedded = database.ownTablePerConnection ? it : it.skip;
  onEmbedded('a purge logs a count at debug level, no keys', async () => {
    const key = newKey();
    remember(await send('/short-ttl', 'purge', key, newBody()).expect(201));
    const [record] = await fixture.dataSource.getRepository(IdempotencyRecord).findBy({ key });
    await waitUntilPast(record.expiresAt);
    expect(await fixture.purgeJob.purgeNow()).toBeGreaterThanOrEqual(1);
    expect(moduleLines('Purged').map((line) => line.level)).toContain('debug');
    expectNothingLeaked();
  });

  it('no line of the whole run holds a key beyond its truncated form, or a body', () => {
    expectNothingLeaked({ all: true });
    report(`log lines on ${name}: every log path driven, ${secrets.size} key and body markers`, {
      'lines captured': log.lines.length,
      'by level': JSON.stringify(tally(log.lines.map((line) => line.level))),
      'module lines (context Idempotency)': log.lines.filter(
        (line) => line.context === 'Idempotency',
      ).length,
      'lines holding a whole key, more of a key than its first 8 characters, or a body': 0,
    });
  });
});
