import { DataSource } from 'typeorm';
import { IdempotencyRecord, type IdempotencyModuleOptions } from '../lib/index.js';
import {
  createFixtureApp,
  recordsOf,
  waitUntilPast,
  type FixtureApp,
} from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';
import { CapturedLog } from './support/captured-log.js';
import { waitFor } from './support/reliability.js';

describe.each(eachDatabase)('the replay cache on %s', (name, database) => {
  let dataSource: DataSource;
  const apps: FixtureApp[] = [];
  // Nest's logger is process-wide: every app of this file logs here.
  const log = new CapturedLog();
  async function app(options: Partial<IdempotencyModuleOptions> = {}): Promise<FixtureApp> {
    const fixture = await createFixtureApp(database, options, 'express', {
      dataSource,
      logger: log,
    });
    apps.push(fixture);
    return fixture;
  }
  /** How many times a process of this file began to listen for operators' deletions. */
  const listened = () =>
    log.lines.filter((line) => line.text.includes('Listening for records that operators delete'))
      .length;
  /**
   * Deletes a key's record by hand: only a cache can still answer for it. On PostgreSQL a process
   * starts listening for operators' deletions once its cache holds a record, and keeps only what
   * the store still holds when it first listens: the hand delete comes once it listens (`after`:
   * the count of `listened()` before the process cached its first record).
   */
  const forget = async (key: string, after?: number) => {
    if ((name === 'postgres' || name === 'pgbouncer-session') && after !== undefined) {
      await waitFor('the process to listen for deletions', () =>
        listened() > after ? true : undefined,
      );
    }
    await dataSource.getRepository(IdempotencyRecord).delete({ key });
  };

  beforeAll(async () => {
    dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
  });
  afterAll(async () => {
    for (const fixture of apps) await fixture.close();
    await dataSource.destroy();
  });

  it('answers a retry of a completed key it has read without the store; turned off, the store decides', async () => {
    const before = listened();
    const cached = await app();
    const uncached = await app({ replayCache: false });
    for (const [fixture, runs] of [
      [cached, 1],
      [uncached, 2],
    ] as const) {
      const key = newKey();
      const first = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201); // read from the store
      await forget(key, runs === 1 ? before : undefined);
      const retry = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      expect(fixture.calls.count('charges', key)).toBe(runs);
      if (runs === 1) {
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(retry.body).toEqual(first.body);
      } else {
        expect(retry.headers['idempotent-replayed']).toBeUndefined();
      }
    }
  });

  it('refuses another payload from the cache as the store does (422)', async () => {
    const before = listened();
    const fixture = await app();
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    await forget(key, before);
    expectProblem(await post(fixture.http, '/charges', key, { amount: 2 }), 422, 'key-reused');
  });

  it('never replays past the TTL: the key runs again, and another process’s new result is what replays', async () => {
    const cachedOne = await app();
    const other = await app();
    const key = newKey();
    await post(cachedOne.http, '/short-ttl', key).expect(201);
    await post(cachedOne.http, '/short-ttl', key).expect(201); // cached in cachedOne
    const [record] = await recordsOf(dataSource, key);
    await waitUntilPast(Number(record.expiresAt));
    // The other process takes the expired key over and stores a new result …
    const rerun = await post(other.http, '/short-ttl', key).expect(201);
    expect(rerun.headers['idempotent-replayed']).toBeUndefined();
    // … which is what the first process replays now, not what it had cached.
    const replay = await post(cachedOne.http, '/short-ttl', key).expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(rerun.body);
    expect(cachedOne.calls.count('short-ttl', key) + other.calls.count('short-ttl', key)).toBe(2);
  });

  it('holds at most maxEntries records, dropping the oldest', async () => {
    const before = listened();
    const fixture = await app({ replayCache: { maxEntries: 2 } });
    const keys = [newKey(), newKey(), newKey()];
    for (const key of keys) {
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    }
    for (const key of keys) await forget(key, before);
    const answers = [];
    for (const key of keys)
      answers.push(
        (await post(fixture.http, '/charges', key, { amount: 1 })).headers['idempotent-replayed'],
      );
    expect(answers).toEqual([undefined, 'true', 'true']);
    expect(keys.map((key) => fixture.calls.count('charges', key))).toEqual([2, 1, 1]);
  });
});
