import { IdempotencyMetrics, type IdempotencyEvent } from '../lib/index.js';
import { createFixtureApp, recordsOf, waitUntilPast, type FixtureApp } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';

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

  it('counts conflicts, takeovers of expired keys, and purged rows', async () => {
    const key = newKey();
    const expiring = newKey();
    const delta = await countDuring(async () => {
      fixture.gate.hold(key);
      const first = post(fixture.http, '/slow', key).then((response) => response);
      await fixture.gate.arrived(key);
      await post(fixture.http, '/slow', key).expect(409);
      fixture.gate.open(key);
      await first;

      await post(fixture.http, '/short-ttl', expiring).expect(201);
      const [record] = await recordsOf(fixture.dataSource, expiring);
      await waitUntilPast(record.expiresAt);
      await post(fixture.http, '/short-ttl', expiring).expect(201);
      const [again] = await recordsOf(fixture.dataSource, expiring);
      await waitUntilPast(again.expiresAt);
      await fixture.purgeJob.purgeNow();
    });
    expect(delta).toMatchObject({ executed: 3, conflict: 1, expired: 1 });
    expect(delta.purged).toBeGreaterThanOrEqual(1);
  });
});
