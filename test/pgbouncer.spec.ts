import { createFixtureApp, type FixtureApp } from './fixtures/fixture-app.js';
import {
  createLedgerTable,
  LedgerEntry,
  LedgerService,
  ledgerOf,
  TransactionalLeaseController,
} from './fixtures/lease.controller.js';
import { createReliabilityApp } from './fixtures/reliability-app.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases, type TestDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';
import { waitFor } from './support/reliability.js';

/**
 * What only a connection pooler changes, through PgBouncer (`.ci/start-pgbouncer` sets the URLs;
 * the rest of the e2e suite also runs through both pools, as the databases `pgbouncer-transaction`
 * and `pgbouncer-session`):
 * - LISTEN holds only in session pooling. In transaction pooling the listener's probe NOTIFY never
 *   comes back, so waiters poll (and say so once); with `listenerUrl` (a direct connection) they
 *   are woken by notifications again.
 * - Named prepared statements break in transaction pooling (PgBouncer 1.18 here): the next Bind
 *   may land on a server connection that never saw the Parse. The store falls back, without a
 *   failed request.
 *
 * A waiter here polls every five minutes (`waitPollInterval: '5m'`, so its safety-net re-read is
 * that far apart too): one that answers within the test's minute was woken by a notification.
 */
const direct = process.env.DATABASE_URL;
const transaction = testDatabases.find((database) => database.pooler === 'transaction');
const session = testDatabases.find((database) => database.pooler === 'session');
const describeWithPgBouncer = transaction && session && direct ? describe : describe.skip;
if (!transaction || !session || !direct) {
  console.warn(
    '[pgbouncer] SKIPPED: set DATABASE_URL, PGBOUNCER_TRANSACTION_URL and PGBOUNCER_SESSION_URL (eval "$(.ci/start-pgbouncer)")',
  );
}

describeWithPgBouncer('behind PgBouncer', () => {
  const apps: FixtureApp[] = [];
  afterAll(() => Promise.all(apps.map((app) => app.close())));

  async function appOn(
    database: TestDatabase,
    options: { waitPollInterval: string; listenerUrl?: string },
    log = new CapturedLog(),
  ) {
    const app = await createFixtureApp(database, options, 'express', { logger: log });
    apps.push(app);
    return { app, log };
  }

  /** A first request held in its handler, a duplicate waiting for it, then the first released. */
  async function duplicateWaitsForTheFirst(app: FixtureApp, log: CapturedLog) {
    const key = newKey();
    app.gate.hold(key);
    const first = post(app.http, '/slow-wait', key, { amount: 1 }).then((response) => response);
    await app.gate.arrived(key);
    const duplicate = post(app.http, '/slow-wait', key, { amount: 1 }).then((response) => response);
    // Its debug line says the duplicate found the key in progress and waits.
    await waitFor('the duplicate to wait', () =>
      log.lines.some((line) =>
        line.text.startsWith(`Key ${key.slice(0, 8)}… on POST /slow-wait is in progress; waiting`),
      )
        ? true
        : undefined,
    );
    app.gate.open(key);
    const [original, replay] = await Promise.all([first, duplicate]);
    return { key, original, replay };
  }

  it('in session pooling, wakes a waiting duplicate by notification, with no extra setting', async () => {
    const { app, log } = await appOn(session!, { waitPollInterval: '5m' });
    const { key, original, replay } = await duplicateWaitsForTheFirst(app, log);
    expect(original.status).toBe(201);
    expect(replay.status).toBe(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(original.body);
    expect(app.calls.count('slow-wait', key)).toBe(1);
    expect(log.lines.filter((line) => /never reached its LISTEN/.test(line.text))).toEqual([]);
  });

  it('in transaction pooling, finds that notifications never arrive, says so once, and its waiters poll', async () => {
    const { app, log } = await appOn(transaction!, { waitPollInterval: '50ms' });
    for (let round = 0; round < 2; round++) {
      const { key, original, replay } = await duplicateWaitsForTheFirst(app, log);
      expect(replay.status).toBe(201);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
      expect(app.calls.count('slow-wait', key)).toBe(1);
    }
    // The probe waits 5 s for its NOTIFY; meanwhile (and after) waiters poll.
    await waitFor('the warning', () =>
      log.lines.some((line) => /never reached its LISTEN/.test(line.text)) ? true : undefined,
    );
    const { replay } = await duplicateWaitsForTheFirst(app, log);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    const warnings = log.lines.filter((line) => /never reached its LISTEN/.test(line.text));
    expect(warnings).toHaveLength(1);
    expect(warnings[0].level).toBe('warn');
    expect(warnings[0].text).toContain('`listenerUrl`');
  });

  it('in transaction pooling with listenerUrl (a direct connection), wakes waiters by notification again', async () => {
    const { app, log } = await appOn(transaction!, { waitPollInterval: '5m', listenerUrl: direct });
    const { key, replay } = await duplicateWaitsForTheFirst(app, log);
    expect(replay.status).toBe(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(app.calls.count('slow-wait', key)).toBe(1);
    expect(log.lines.filter((line) => /never reached its LISTEN/.test(line.text))).toEqual([]);
  });

  it.each([
    ['transaction', true],
    ['session', false],
  ] as const)(
    'runs transactional routes in %s pooling with no failed request; statements go unprepared there: %s',
    async (pooling, unprepared) => {
      const log = new CapturedLog();
      const app = await createReliabilityApp(
        pooling === 'transaction' ? transaction! : session!,
        {},
        {
          controllers: [TransactionalLeaseController],
          providers: [LedgerService],
          entities: [LedgerEntry],
          logger: log,
        },
      );
      try {
        await createLedgerTable(app.dataSource);
        const keys = Array.from({ length: 30 }, () => newKey());
        // Three waves of ten at once: transactions on many server connections.
        for (let wave = 0; wave < 3; wave++) {
          const batch = keys.slice(wave * 10, wave * 10 + 10);
          const answers = await Promise.all(
            batch.map((key, i) => post(app.baseUrl, '/lease/tx', key, { amount: i + 1 })),
          );
          expect(answers.map((answer) => answer.status)).toEqual(batch.map(() => 201));
        }
        for (const [i, key] of keys.entries()) {
          const replay = await post(app.baseUrl, '/lease/tx', key, { amount: (i % 10) + 1 });
          expect(replay.headers['idempotent-replayed']).toBe('true');
          expect(await ledgerOf(app.dataSource, key)).toHaveLength(1);
        }
        // Either a refused prepared statement outside a transaction said it first, or the
        // session check on the first transaction did (its probe waits 5 s for a NOTIFY).
        const said = () =>
          log.lines.some((line) =>
            /sessions do not last|refused a prepared statement/.test(line.text),
          );
        if (unprepared) await waitFor('the finding', () => (said() ? true : undefined));
        else expect(said()).toBe(false);
        expect(log.lines.filter((line) => line.level === 'error')).toEqual([]);
      } finally {
        await app.close();
      }
    },
  );

  it('in transaction pooling, answers every request while prepared statements fall back: no 5xx, each key once', async () => {
    const { app } = await appOn(transaction!, { waitPollInterval: '50ms' });
    const keys = Array.from({ length: 40 }, () => newKey());
    // Three copies of each key at once: many pool connections, many server connections.
    const responses = await Promise.all(
      keys.flatMap((key, index) =>
        [0, 1, 2].map(() => post(app.http, '/charges', key, { amount: index })),
      ),
    );
    const statuses = responses.map((response) => response.status);
    expect(statuses.filter((status) => status >= 500)).toEqual([]);
    expect(new Set(statuses)).toEqual(new Set(statuses.filter((s) => s === 201 || s === 409)));
    for (const key of keys) expect(app.calls.count('charges', key)).toBe(1);
    // Every key replays its original afterwards.
    for (const [index, key] of keys.entries()) {
      const replay = await post(app.http, '/charges', key, { amount: index });
      expect(replay.status).toBe(201);
      expect(replay.headers['idempotent-replayed']).toBe('true');
    }
  });
});
