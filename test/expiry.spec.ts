import { jest } from '@jest/globals';
import { IdempotencyRecord, IdempotencyStore } from '../lib/index.js';
import {
  createFixtureApp,
  recordsOf,
  waitUntilPast,
  type FixtureApp,
} from './fixtures/fixture-app.js';
import { freezeClockAt } from './support/clock.js';
import { eachDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';

describe.each(eachDatabase)('expiry and purge on %s', (_name, database) => {
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(database, { purgeBatchSize: 3 })));
  afterAll(() => fixture.close());

  it('replays before the TTL ends and treats the key as new after it, whatever the payload', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/short-ttl', key, { n: 1 }).expect(201);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(record.expiresAt - Date.now()).toBeLessThanOrEqual(300);
    // The retry comes 1 ms before the TTL ends, whatever else keeps this machine busy: the
    // module reads the time from Date.now(), frozen here (support/clock.ts).
    freezeClockAt(record.expiresAt - 1);
    try {
      const replay = await post(fixture.http, '/short-ttl', key, { n: 1 });
      expect(replay.headers['idempotent-replayed']).toBe('true');
    } finally {
      jest.useRealTimers();
    }

    await waitUntilPast(record.expiresAt);
    const fresh = await post(fixture.http, '/short-ttl', key, { n: 2 }).expect(201);
    expect(fresh.headers['idempotent-replayed']).toBeUndefined();
    expect(fresh.body.id).not.toBe(first.body.id);
    expect(fixture.calls.count('short-ttl', key)).toBe(2);
  });

  it('uses the module-wide ttl where the route sets none (24h by default)', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key).expect(201);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(record.expiresAt - Date.now()).toBeGreaterThan(23 * 3_600_000);
  });

  it('purges expired records in batches and keeps live ones', async () => {
    const expiredKeys = Array.from({ length: 7 }, newKey);
    for (const key of expiredKeys) await post(fixture.http, '/short-ttl', key).expect(201);
    const liveKey = newKey();
    await post(fixture.http, '/charges', liveKey).expect(201);
    const latest = await recordsOf(fixture.dataSource, expiredKeys[6]);
    await waitUntilPast(latest[0].expiresAt);

    const store = fixture.app.get<IdempotencyStore>(IdempotencyStore);
    const batches: number[] = [];
    const purgeExpired = store.purgeExpired.bind(store);
    const spy = jest.spyOn(store, 'purgeExpired').mockImplementation(async (now, limit) => {
      const deleted = await purgeExpired(now, limit);
      batches.push(deleted);
      return deleted;
    });
    try {
      const purged = await fixture.purgeJob.purgeNow();
      // Every statement deletes at most a batch, and the run stops at the first short batch.
      expect(batches.every((deleted) => deleted <= 3)).toBe(true);
      expect(batches.slice(0, -1).every((deleted) => deleted === 3)).toBe(true);
      expect(batches.reduce((sum, deleted) => sum + deleted, 0)).toBe(purged);
      // On a server other specs' purges may delete these rows first; on an embedded database the
      // table is this spec's own, so the seven rows are this purge's: 3 + 3 + 1.
      if (database.ownTablePerConnection) {
        expect(purged).toBeGreaterThanOrEqual(7);
        expect(batches.length).toBeGreaterThanOrEqual(3);
      }
    } finally {
      spy.mockRestore();
    }
    for (const key of expiredKeys) expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    expect(await recordsOf(fixture.dataSource, liveKey)).toHaveLength(1);
  });
});

describe.each(eachDatabase)('the purge timer on %s', (_name, database) => {
  it('purges on its interval without being called', async () => {
    const fixture = await createFixtureApp(database, { purgeInterval: 50 });
    try {
      const key = newKey();
      await post(fixture.http, '/short-ttl', key).expect(201);
      const [record] = await recordsOf(fixture.dataSource, key);
      await waitUntilPast(record.expiresAt);
      const repository = fixture.dataSource.getRepository(IdempotencyRecord);
      // Bounded poll for the timer's effect: a handful of intervals, not a guess at its timing.
      for (let i = 0; i < 100 && (await repository.countBy({ key })) > 0; i++) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      expect(await repository.countBy({ key })).toBe(0);
    } finally {
      await fixture.close();
    }
  });
});
