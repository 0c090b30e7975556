import { randomUUID } from 'node:crypto';
import { DataSource, type Logger } from 'typeorm';
import { IdempotencyRecord, TypeOrmIdempotencyStore, type RecordId } from '../lib/index.js';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import {
  createLedgerTable,
  LedgerEntry,
  LedgerService,
  TransactionalLeaseController,
} from './fixtures/lease.controller.js';
import { createReliabilityApp } from './fixtures/reliability-app.js';
import { testDatabases, type TestDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';
import { describeOnPostgres, waitFor } from './support/reliability.js';

/** POSTs `body` twice under `key`: the handler runs once, the second answer replays the first. */
async function expectRunOnceThenReplayed(fixture: FixtureApp, key: string, body: object) {
  const first = await post(fixture.http, '/charges', key, body).expect(201);
  const replay = await post(fixture.http, '/charges', key, body).expect(201);
  expect(replay.headers['idempotent-replayed']).toBe('true');
  expect(replay.body).toEqual(first.body);
  expect(fixture.calls.count('charges', key)).toBe(1);
  return first.body;
}

/** PostgreSQL through a pool of one connection, whose session the test can look into. */
const oneConnection = (url: string): TestDatabase => ({
  name: 'postgres',
  shared: true,
  ownTablePerConnection: false,
  transactions: true,
  options: () => ({ type: 'postgres', url, extra: { max: 1 } }),
});

/**
 * On PostgreSQL the store's statements are named prepared statements of the `pg` driver. A pool of
 * one connection lets the test look at that connection's session (pg_prepared_statements) and
 * pull the statements from under the driver, as a pooler that hands each transaction another
 * server connection would (PgBouncer in transaction mode before 1.21).
 */
describeOnPostgres('prepared statements', (url) => {
  let fixture: FixtureApp;
  beforeAll(async () => {
    fixture = await createFixtureApp(oneConnection(url));
  });
  afterAll(() => fixture.close());

  /** The statements' names, without the hash of their text that ends each. */
  const preparedOnTheConnection = async (): Promise<string[]> =>
    (await fixture.dataSource.query(`SELECT name FROM pg_prepared_statements ORDER BY name`)).map(
      (row: { name: string }) => row.name.replace(/_[0-9a-f]{12}$/, ''),
    );

  it('prepares the claim and the completion once per connection, and replays through them', async () => {
    const key = newKey();
    await expectRunOnceThenReplayed(fixture, key, { amount: 5 });
    expect(await preparedOnTheConnection()).toEqual([
      'nestjs_idempotency_claim',
      'nestjs_idempotency_complete',
    ]);
  });

  it('falls back to unprepared statements when the server no longer knows them, without failing a request', async () => {
    await fixture.dataSource.query('DEALLOCATE ALL');
    const key = newKey();
    await expectRunOnceThenReplayed(fixture, key, { amount: 6 });
    expect((await recordsOf(fixture.dataSource, key)).map((r) => r.state)).toEqual(['completed']);
    // Nothing was prepared again: the store runs its statements unprepared from then on.
    expect(await preparedOnTheConnection()).toEqual([]);
  });
});

/**
 * The store runs its prepared statements on the `pg` client itself, past TypeORM's query runner:
 * what TypeORM logs of its own queries must still reach the DataSource's logger.
 */
describeOnPostgres("prepared statements and the DataSource's logger", (url) => {
  const slowMs = 50;
  const logged: { slow: { ms: number; query: string }[]; failed: string[] } = {
    slow: [],
    failed: [],
  };
  const logger: Logger = {
    logQuery: () => undefined,
    logQueryError: (_error, query) => void logged.failed.push(query),
    logQuerySlow: (ms, query) => void logged.slow.push({ ms, query }),
    logSchemaBuild: () => undefined,
    logMigration: () => undefined,
    log: () => undefined,
  };
  let dataSource: DataSource;
  let store: TypeOrmIdempotencyStore;
  beforeAll(async () => {
    dataSource = new DataSource({
      type: 'postgres',
      url,
      entities: [IdempotencyRecord],
      maxQueryExecutionTime: slowMs,
      logger,
    });
    await dataSource.initialize();
    store = new TypeOrmIdempotencyStore(dataSource, { batchStatements: false });
  });
  afterAll(async () => {
    await store.close();
    await dataSource.destroy();
  });

  const claim = (id: RecordId) => {
    const now = Date.now();
    return store.claim({
      id,
      fingerprint: 'fp',
      token: randomUUID(),
      now,
      lockedUntil: now + 60_000,
    });
  };

  it('reports a statement slower than maxQueryExecutionTime', async () => {
    const id: RecordId = { scope: '', endpoint: 'POST /slow', key: newKey() };
    const claimed = await claim(id);
    if (!claimed.claimed) throw new Error('not claimed');
    // Another session holds the row: the completion waits for it, past maxQueryExecutionTime.
    const holder = dataSource.createQueryRunner();
    await holder.startTransaction();
    const [{ pid }] = await holder.query('SELECT pg_backend_pid() AS pid');
    await holder.query(`SELECT 1 FROM idempotency_records WHERE idempotency_key = $1 FOR UPDATE`, [
      id.key,
    ]);
    const startedAt = Date.now();
    const completion = store.complete(
      claimed.lease,
      { status: 201, headers: {}, body: null, bodyEncoding: 'json', isError: false },
      Date.now() + 60_000,
    );
    await waitFor('the completion to wait for the row lock', async () => {
      const [row] = await dataSource.query(
        'SELECT count(*)::int AS waiting FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))',
        [pid],
      );
      return row.waiting > 0 && Date.now() - startedAt > slowMs * 2 ? true : undefined;
    });
    await holder.commitTransaction();
    await holder.release();
    expect(await completion).toBe(true);
    expect(logged.slow.map(({ query }) => query)).toEqual([
      expect.stringMatching(/^UPDATE .*idempotency_records/),
    ]);
    expect(logged.slow[0].ms).toBeGreaterThan(slowMs);
  });

  it('reports a statement that fails', async () => {
    // PostgreSQL refuses a NUL in text: the claim fails, and the failure is logged.
    await expect(
      claim({ scope: '', endpoint: 'POST /failing', key: `nul\0${newKey()}` }),
    ).rejects.toThrow();
    expect(logged.failed).toEqual([expect.stringMatching(/^WITH live AS/)]);
  });
});

/**
 * Inside a transaction (a transactional route's completion) a refused named statement would abort
 * the handler's transaction, so there the store runs unnamed until a check (a LISTEN and a NOTIFY
 * through the pool) has shown that sessions last between transactions; on PostgreSQL itself they
 * do, and the completion becomes a prepared statement of the session.
 */
describeOnPostgres('prepared statements inside transactions', (url) => {
  it('runs the completion unnamed at first, then prepared once sessions are known to last', async () => {
    const app = await createReliabilityApp(
      oneConnection(url),
      {},
      {
        controllers: [TransactionalLeaseController],
        providers: [LedgerService],
        entities: [LedgerEntry],
      },
    );
    try {
      await createLedgerTable(app.dataSource);
      const prepared = async (): Promise<string[]> =>
        (await app.dataSource.query(`SELECT name FROM pg_prepared_statements`)).map(
          (row: { name: string }) => row.name.replace(/_[0-9a-f]{12}$/, ''),
        );
      const first = await post(app.baseUrl, '/lease/tx', newKey(), { amount: 1 });
      expect(first.status).toBe(201);
      expect(await prepared()).not.toContain('nestjs_idempotency_complete');
      await waitFor(
        'the completion to run prepared',
        async () => {
          const next = await post(app.baseUrl, '/lease/tx', newKey(), { amount: 2 });
          expect(next.status).toBe(201);
          return (await prepared()).includes('nestjs_idempotency_complete') ? true : undefined;
        },
        { timeoutMs: 15_000, intervalMs: 100 },
      );
    } finally {
      await app.close();
    }
  });
});

/**
 * PGlite (typeorm-pglite replaces `pg`, and its client takes no query configs): the statements are
 * prepared with SQL `PREPARE` in its one session and run by `EXECUTE` with the values inlined as
 * literals, so the literals must carry any text back unchanged.
 */
describe('prepared statements on PGlite', () => {
  const pglite = testDatabases.find((database) => database.name === 'pglite')!;
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(pglite)));
  afterAll(() => fixture.close());

  const preparedInTheSession = async (): Promise<string[]> =>
    (await fixture.dataSource.query(`SELECT name FROM pg_prepared_statements ORDER BY name`)).map(
      (row: { name: string }) => row.name.replace(/_[0-9a-f]{12}$/, ''),
    );

  it('prepares the claim and the completion once, and replays through them', async () => {
    const key = newKey();
    await expectRunOnceThenReplayed(fixture, key, { amount: 5 });
    expect(await preparedInTheSession()).toEqual([
      'nestjs_idempotency_claim',
      'nestjs_idempotency_complete',
    ]);
  });

  it.each(['on', 'off'])(
    'stores and replays quotes, backslashes and non-ASCII text exactly, in the key and the body (standard_conforming_strings %s)',
    async (setting) => {
      await fixture.dataSource.query(`SET standard_conforming_strings = ${setting}`);
      const key = `it's\\a key '' \\' ${newKey()}`;
      const amount = `'); DROP TABLE idempotency_records; -- \\' \\\\ E'\\x41' ü 💳 $1 "quoted"`;
      const first = await expectRunOnceThenReplayed(fixture, key, { amount });
      expect(first.amount).toBe(amount);
      const [record] = await recordsOf(fixture.dataSource, key);
      expect(record.key).toBe(key);
      expect(JSON.parse(record.responseBody!)).toEqual(first);
      await fixture.dataSource.query('RESET standard_conforming_strings');
    },
  );

  it('prepares again when the session lost its statements, without failing a request', async () => {
    await fixture.dataSource.query('DEALLOCATE ALL');
    expect(await preparedInTheSession()).toEqual([]);
    const key = newKey();
    await expectRunOnceThenReplayed(fixture, key, { amount: 6 });
    expect(await preparedInTheSession()).toEqual([
      'nestjs_idempotency_claim',
      'nestjs_idempotency_complete',
    ]);
  });
});
