import { jest } from '@jest/globals';
import { IdempotencyMetrics, IdempotencyRecord, type IdempotencyEvent } from '../lib/index.js';
import {
  createFixtureApp,
  recordsOf,
  waitUntilPast,
  type FixtureApp,
} from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { freezeClockAt, setClock } from './support/clock.js';
import { newKey, post } from './support/http.js';

const DAY_MS = 86_400_000;

describe.each(eachDatabase)('counters on %s', (_name, database) => {
  let fixture: FixtureApp;
  let metrics: IdempotencyMetrics;
  beforeAll(async () => {
    fixture = await createFixtureApp(database);
    metrics = fixture.app.get(IdempotencyMetrics);
  });
  afterAll(() => fixture.close());

  /** The counters' increase while `scenario` runs. */
  async function countDuring(scenario: () => Promise<void>) {
    const before = metrics.snapshot();
    await scenario();
    const after = metrics.snapshot();
    return Object.fromEntries(
      (Object.keys(after) as IdempotencyEvent[])
        .map((event) => [event, after[event] - before[event]])
        .filter(([, delta]) => delta !== 0),
    );
  }

  it('counts executions, replays, mismatches and releases', async () => {
    const key = newKey();
    const seen: string[] = [];
    const unsubscribe = metrics.onEvent((event) => seen.push(event));
    const delta = await countDuring(async () => {
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', key, { amount: 2 }).expect(422);
      await post(fixture.http, '/flaky', newKey(), { fail: 'crash' }).expect(500);
    });
    unsubscribe();
    expect(delta).toEqual({ executed: 2, replayed: 1, mismatch: 1, released: 1 });
    expect(seen).toEqual(['executed', 'replayed', 'mismatch', 'executed', 'released']);
  });

  it('a listener that throws changes nothing: the request is answered, its key completed and replayed', async () => {
    const key = newKey();
    const unsubscribe = metrics.onEvent(() => {
      throw new Error('metrics exporter is down');
    });
    try {
      const first = await post(fixture.http, '/charges', key, { amount: 1 });
      expect(first.status).toBe(201);
      const retry = await post(fixture.http, '/charges', key, { amount: 1 });
      expect(retry.status).toBe(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(fixture.calls.count('charges', key)).toBe(1);
      await post(fixture.http, '/flaky', newKey(), { fail: 'crash' }).expect(500);
    } finally {
      unsubscribe();
    }
  });

  it('counts conflicts, takeovers of expired keys, and purged rows', async () => {
    let purged = 0;
    const key = newKey();
    const expiring = newKey();
    const purgeable = newKey();
    const delta = await countDuring(async () => {
      fixture.gate.hold(key);
      const first = post(fixture.http, '/slow', key).then((response) => response);
      await fixture.gate.arrived(key);
      await post(fixture.http, '/slow', key).expect(409);
      fixture.gate.open(key);
      await first;

      // The takeover happens on this app's clock, two days ahead of the real one: no purge of
      // another spec sharing the table (on the real clock) can delete the expired row before it.
      freezeClockAt(Date.now() + 2 * DAY_MS);
      try {
        await post(fixture.http, '/short-ttl', expiring).expect(201);
        const [record] = await recordsOf(fixture.dataSource, expiring);
        setClock(record.expiresAt);
        await post(fixture.http, '/short-ttl', expiring).expect(201);
      } finally {
        jest.useRealTimers();
        await fixture.dataSource.getRepository(IdempotencyRecord).delete({ key: expiring });
      }

      await post(fixture.http, '/short-ttl', purgeable).expect(201);
      const [record] = await recordsOf(fixture.dataSource, purgeable);
      await waitUntilPast(record.expiresAt);
      purged = await fixture.purgeJob.purgeNow();
    });
    expect(delta).toMatchObject({ executed: 4, conflict: 1, expired: 1 });
    expect(delta.purged ?? 0).toBe(purged);
    // On a server another spec's purge may delete the expired row first; an embedded table is ours.
    if (database.ownTablePerConnection) expect(purged).toBeGreaterThanOrEqual(1);
  });
});
