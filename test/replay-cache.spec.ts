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

describe.each(eachDatabase)('the replay cache on %s', (_name, database) => {
  let dataSource: DataSource;
  const apps: FixtureApp[] = [];
  async function app(options: Partial<IdempotencyModuleOptions> = {}): Promise<FixtureApp> {
    const fixture = await createFixtureApp(database, options, 'express', { dataSource });
    apps.push(fixture);
    return fixture;
  }
  /** Deletes a key's record by hand: only a cache can still answer for it. */
  const forget = (key: string) => dataSource.getRepository(IdempotencyRecord).delete({ key });

  beforeAll(async () => {
    dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
  });
  afterAll(async () => {
    for (const fixture of apps) await fixture.close();
    await dataSource.destroy();
  });

  it('answers a retry of a completed key it has read without the store; turned off, the store decides', async () => {
    const cached = await app();
    const uncached = await app({ replayCache: false });
    for (const [fixture, runs] of [
      [cached, 1],
      [uncached, 2],
    ] as const) {
      const key = newKey();
      const first = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201); // read from the store
      await forget(key);
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
    const fixture = await app();
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    await forget(key);
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
    const fixture = await app({ replayCache: { maxEntries: 2 } });
    const keys = [newKey(), newKey(), newKey()];
    for (const key of keys) {
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    }
    for (const key of keys) await forget(key);
    const answers = [];
    for (const key of keys)
      answers.push(
        (await post(fixture.http, '/charges', key, { amount: 1 })).headers['idempotent-replayed'],
      );
    expect(answers).toEqual([undefined, 'true', 'true']);
    expect(keys.map((key) => fixture.calls.count('charges', key))).toEqual([2, 1, 1]);
  });
});
