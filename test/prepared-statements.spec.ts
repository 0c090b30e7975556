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
