import { jest } from '@jest/globals';
import { randomUUID } from 'node:crypto';
import { DataSource, In } from 'typeorm';
import { IdempotencyRecord } from '../lib/index.js';
import { fingerprintRequest } from '../lib/utils/fingerprint.js';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { freezeClockAt, setClock } from './support/clock.js';
import { expectProblem, newKey as randomKey, post } from './support/http.js';
import { describeOnPostgres, report, sharedDatabase, waitFor } from './support/reliability.js';

const DAY_MS = 86_400_000;

/** Every request here runs at a millisecond of our choosing: see support/clock.ts. */
describe.each(eachDatabase)(
  'TTL and lock boundaries, to the millisecond, on %s',
  (name, database) => {
    let fixture: FixtureApp;
    /** The keys used: their rows carry times up to two days ahead, so they go at the end. */
    const keys: string[] = [];
    const newKey = () => {
      keys.push(randomKey());
      return keys.at(-1)!;
    };
    beforeAll(async () => (fixture = await createFixtureApp(database)));
    afterAll(async () => {
      await fixture.dataSource.getRepository(IdempotencyRecord).delete({ key: In(keys) });
      await fixture.close();
    });
    afterEach(() => jest.useRealTimers());

    it('a completed key replays until the last millisecond of its TTL, and runs as new from the first one past it', async () => {
      const start = Date.now();
      freezeClockAt(start);
      const key = newKey();
      const first = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      const [record] = await recordsOf(fixture.dataSource, key);
      expect(record.expiresAt).toBe(start + DAY_MS); // the default ttl, counted from the completion

      setClock(record.expiresAt - 1);
      const lastReplay = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      expect(lastReplay.headers['idempotent-replayed']).toBe('true');
      expect(lastReplay.body).toEqual(first.body);
      expectProblem(await post(fixture.http, '/charges', key, { amount: 2 }), 422, 'key-reused');
      expect(fixture.calls.count('charges', key)).toBe(1);

      setClock(record.expiresAt);
      const fresh = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      expect(fresh.headers['idempotent-replayed']).toBeUndefined();
      expect(fresh.body.id).not.toBe(first.body.id);
      expect(fixture.calls.count('charges', key)).toBe(2);
      const [renewed] = await recordsOf(fixture.dataSource, key);
      expect(renewed.expiresAt).toBe(record.expiresAt + DAY_MS);
      // The new run's response is what replays now.
      const replay = await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      expect(replay.body).toEqual(fresh.body);
      report(`TTL boundary on ${name} (clock frozen, ttl 24h)`, {
        'retry at expires_at − 1 ms, same payload': `${lastReplay.status}, replayed`,
        'retry at expires_at − 1 ms, other payload': '422 key-reused',
        'retry at expires_at': `${fresh.status}, handler ran again (new key life until expires_at + 24h)`,
      });
    });

    it('a lock holds until its last millisecond (409), and a retry at its end takes the key over', async () => {
      const start = Date.now();
      freezeClockAt(start);
      const key = newKey();
      fixture.gate.hold(key);
      const abandoned = post(fixture.http, '/short-lock', key).then((response) => response);
      await fixture.gate.arrived(key);
      const [record] = await recordsOf(fixture.dataSource, key);
      expect(record.expiresAt).toBe(start + 300); // the route's lockTimeout

      setClock(record.expiresAt - 1);
      const conflict = await post(fixture.http, '/short-lock', key);
      expectProblem(conflict, 409, 'request-in-progress');
      expect(conflict.headers['retry-after']).toBe('1');
      expect(fixture.calls.count('short-lock', key)).toBe(1);

      setClock(record.expiresAt);
      const takeover = await post(fixture.http, '/short-lock', key).expect(201);
      expect(fixture.calls.count('short-lock', key)).toBe(2);
      fixture.gate.open(key);
      expect((await abandoned).status).toBe(201); // its late completion finds the lease gone
      const replay = await post(fixture.http, '/short-lock', key).expect(201);
      expect(replay.body).toEqual(takeover.body);
    });

    // The purge deletes every expired row of the table: at a frozen future time on a database server
    // other specs share it would delete their rows too, so this one runs on the embedded databases.
    const onEmbedded = database.ownTablePerConnection ? it : it.skip;
    onEmbedded(
      'the purge deletes a record from the millisecond its TTL ends, not before',
      async () => {
        const start = Date.now();
        freezeClockAt(start);
        const key = newKey();
        await post(fixture.http, '/short-ttl', key).expect(201);
        const [record] = await recordsOf(fixture.dataSource, key);
        setClock(record.expiresAt - 1);
        await fixture.purgeJob.purgeNow();
        expect(await recordsOf(fixture.dataSource, key)).toHaveLength(1);
        setClock(record.expiresAt);
        await fixture.purgeJob.purgeNow();
        expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
      },
    );
  },
);

describeOnPostgres('two retries of an expired key at the same moment', (url) => {
  let fixture: FixtureApp;
  let db: DataSource;
  beforeAll(async () => {
    fixture = await createFixtureApp(sharedDatabase!);
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
  });
  afterAll(async () => {
    await fixture?.close();
    await db?.destroy();
  });

  /**
   * Staged with a row lock, so the race happens every time: the expired record is locked by this
   * test's transaction, the request's claim waits for it, and the test then commits what the winning
   * retry would have written (a takeover: in progress, locked for a minute). The waiting claim must
   * see that and answer 409, as to any duplicate of a running request.
   */
  const newKey = randomKey;
  it.each([
    ['another payload', 'the loser got a 422 for the expired payload'],
    ['the same payload', 'the loser replayed the expired response'],
  ])(
    'the expired record was of %s: the loser of the takeover gets a 409 (before the fix: %s)',
    async (payload) => {
      const key = newKey();
      const body = { amount: 5 };
      const fingerprint = fingerprintRequest({ method: 'POST', url: '/charges', body });
      const id = ['', 'POST /charges', key];
      const now = Date.now();
      await db.query(
        `INSERT INTO idempotency_records (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
         expires_at, created_at, response_status, response_headers, response_body, response_body_encoding)
       VALUES ($1, $2, $3, $4, 'completed', $5, $6, $7, 201, '{}', '{"expired":true}', 'json')`,
        [
          ...id,
          payload === 'the same payload' ? fingerprint : 'f'.repeat(64),
          randomUUID(),
          now - 1000,
          now - DAY_MS,
        ],
      );
      const winner = db.createQueryRunner();
      try {
        await winner.startTransaction();
        await winner.query(
          'SELECT 1 FROM idempotency_records WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3 FOR UPDATE',
          id,
        );
        const [{ pid }] = await winner.query('SELECT pg_backend_pid() AS pid');
        const loser = post(fixture.http, '/charges', key, body).then((response) => response);
        await waitFor('the claim to wait for the row lock', async () => {
          const [{ n }] = await db.query(
            'SELECT count(*)::int AS n FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))',
            [pid],
          );
          return n > 0 ? true : undefined;
        });
        await winner.query(
          `UPDATE idempotency_records SET fingerprint = $4, state = 'in_progress', lease_token = $5, expires_at = $6,
           created_at = $7, response_status = NULL, response_headers = NULL, response_body = NULL, response_body_encoding = NULL
         WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3`,
          [...id, fingerprint, randomUUID(), Date.now() + 60_000, Date.now()],
        );
        await winner.commitTransaction();
        const response = await loser;
        expect(response.body).not.toEqual({ expired: true });
        expectProblem(response, 409, 'request-in-progress');
        expect(fixture.calls.count('charges', key)).toBe(0);
        report(
          `two retries of an expired key at once on PostgreSQL (expired record of ${payload})`,
          {
            'the loser of the takeover race': `${response.status} ${response.body.type.split(':').at(-1)}, handler not run`,
          },
        );
      } finally {
        if (winner.isTransactionActive) await winner.rollbackTransaction();
        await winner.release();
        await db.query(
          'DELETE FROM idempotency_records WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3',
          id,
        );
      }
    },
  );
});
