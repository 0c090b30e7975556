import { Logger } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource, type QueryRunner } from 'typeorm';
import { createFixtureApp } from './fixtures/fixture-app.js';
import { createEffectsTables, dropEffectsTables } from './support/effects.js';
import { HttpClient, isReplay, jsonOf } from './support/http-client.js';
import { post } from './support/http.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { describeOnPostgres, runTag, sharedDatabase, waitFor } from './support/reliability.js';

/**
 * Wait mode on PostgreSQL: duplicates are woken by LISTEN/NOTIFY. The apps here poll every five
 * minutes (WAIT_POLL_INTERVAL=5m, so the safety-net re-read is that far apart too) and the route's
 * wait and lock last five minutes: a waiter that answers within the test's 60 s was woken by a
 * notification — without one it would still be asleep when the test times out.
 */
describeOnPostgres('wait mode woken by LISTEN/NOTIFY', (url) => {
  const tag = runTag('wait');
  const tenant = { 'X-Tenant': tag };
  let db: DataSource;
  /** The session that holds the gates of /gated (advisory locks on the key). */
  let gate: QueryRunner;
  let first: AppProcess;
  let waiting: AppProcess;
  let toFirst: HttpClient;
  let toWaiting: HttpClient;

  const hold = (key: string) => gate.query('SELECT pg_advisory_lock(hashtext($1))', [key]);
  const open = (key: string) => gate.query('SELECT pg_advisory_unlock(hashtext($1))', [key]);

  /** Backends of one app process that LISTEN (the last statement of a listening session). */
  const listeners = async (appName: string): Promise<number[]> =>
    (
      await db.query(
        `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'`,
        [appName],
      )
    ).map((row: { pid: number }) => row.pid);

  /** How many of `app`'s requests with `key` have started waiting (its debug log says so). */
  const waitersOf = (app: AppProcess, key: string) =>
    app.output().split(`Key ${key.slice(0, 8)}… on POST /gated is in progress; waiting`).length - 1;

  const executions = async (key: string): Promise<{ pid: number }[]> =>
    db.query(`SELECT pid FROM ${tag} WHERE idempotency_key = $1`, [key]);

  /**
   * Sends the first request for `key` to the first app and resolves once its handler is held;
   * `response` settles when the gate is opened.
   */
  async function startHeldFirst(key: string, headers: Record<string, string> = {}) {
    await hold(key);
    const response = toFirst.post('/gated', key, { amount: 1 }, { ...tenant, ...headers });
    await first.waitForOutput(new RegExp(`entered gated ${key}`));
    return { response };
  }

  /** Sends `count` duplicates to the other app; resolves once they all wait and it listens. */
  async function startWaiters(key: string, count = 1) {
    const responses = Promise.all(
      Array.from({ length: count }, () => toWaiting.post('/gated', key, { amount: 1 }, tenant)),
    );
    await waitFor(`${count} waiters`, () => (waitersOf(waiting, key) >= count ? true : undefined));
    await waitFor('the LISTEN connection', async () =>
      (await listeners(`${tag}_waiting`)).length > 0 ? true : undefined,
    );
    return { responses };
  }

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
    await createEffectsTables(db, tag);
    gate = db.createQueryRunner();
    await gate.connect();
    const env = { DATABASE_URL: url, EFFECTS_TABLE: tag, WAIT_POLL_INTERVAL: '5m' };
    [first, waiting] = await Promise.all([
      startAppProcess('test/fixtures/wait-server.js', { ...env, APP_NAME: `${tag}_first` }),
      startAppProcess('test/fixtures/wait-server.js', { ...env, APP_NAME: `${tag}_waiting` }),
    ]);
    toFirst = new HttpClient(first.baseUrl);
    toWaiting = new HttpClient(waiting.baseUrl);
  }, 60_000);

  afterAll(async () => {
    toFirst?.close();
    toWaiting?.close();
    await Promise.all([first?.stop(), waiting?.stop()]);
    await gate?.release();
    if (db?.isInitialized) {
      await dropEffectsTables(db, tag);
      await db.query('DELETE FROM idempotency_records WHERE scope = $1', [tag]);
      await db.destroy();
    }
  });

  it('wakes a duplicate waiting in another process when the first completes: it replays', async () => {
    const key = randomUUID();
    const original = await startHeldFirst(key);
    const waiter = await startWaiters(key);
    await open(key);

    const [done, [replay]] = await Promise.all([original.response, waiter.responses]);
    expect(done.status).toBe(201);
    expect(isReplay(done)).toBe(false);
    expect(replay.status).toBe(201);
    expect(isReplay(replay)).toBe(true);
    expect(jsonOf(replay)).toEqual(jsonOf(done));
    expect(await executions(key)).toHaveLength(1);
  });

  it('wakes a waiter when the first fails and releases the key: the waiter claims it and runs', async () => {
    const key = randomUUID();
    const failing = await startHeldFirst(key, { 'X-Fail': '1' });
    const waiter = await startWaiters(key);
    await open(key);

    const [failed, [retried]] = await Promise.all([failing.response, waiter.responses]);
    expect(failed.status).toBe(503);
    expect(retried.status).toBe(201);
    expect(isReplay(retried)).toBe(false);
    expect(jsonOf(retried).pid).toBe(waiting.child.pid);
    expect(await executions(key)).toEqual([{ pid: waiting.child.pid }]);
  });

  it('serves 50 waiters on one key from one LISTEN connection per process, opened on the first wait', async () => {
    const key = randomUUID();
    const original = await startHeldFirst(key);
    const waiters = await startWaiters(key, 50);

    expect(await listeners(`${tag}_waiting`)).toHaveLength(1);
    // The first app never had a request wait: it opened no LISTEN connection.
    expect(await listeners(`${tag}_first`)).toHaveLength(0);

    await open(key);
    const [done, replays] = await Promise.all([original.response, waiters.responses]);
    expect(done.status).toBe(201);
    expect(replays.map((r) => [r.status, isReplay(r)])).toEqual(Array(50).fill([201, true]));
    expect(new Set(replays.map((r) => r.text))).toEqual(new Set([done.text]));
    expect(await executions(key)).toHaveLength(1);
    expect(await listeners(`${tag}_waiting`)).toHaveLength(1);
  });

  it('reconnects after its LISTEN connection is terminated: waiters during and after are woken', async () => {
    const key = randomUUID();
    const original = await startHeldFirst(key);
    const waiter = await startWaiters(key);
    const [killed] = await listeners(`${tag}_waiting`);
    await db.query('SELECT pg_terminate_backend($1)', [killed]);
    await waiting.waitForOutput(/Lost the LISTEN connection/);
    await waitFor('a new LISTEN connection', async () => {
      const pids = await listeners(`${tag}_waiting`);
      return pids.length === 1 && pids[0] !== killed ? true : undefined;
    });
    // The waiter outlived the loss; the completion's notification reaches it on the new connection.
    await open(key);
    const [done, [replay]] = await Promise.all([original.response, waiter.responses]);
    expect(replay.status).toBe(201);
    expect(isReplay(replay)).toBe(true);
    expect(jsonOf(replay)).toEqual(jsonOf(done));

    // A later waiter, on the new connection only.
    const later = randomUUID();
    const laterOriginal = await startHeldFirst(later);
    const laterWaiter = await startWaiters(later);
    await open(later);
    const [laterDone, [laterReplay]] = await Promise.all([
      laterOriginal.response,
      laterWaiter.responses,
    ]);
    expect(isReplay(laterReplay)).toBe(true);
    expect(jsonOf(laterReplay)).toEqual(jsonOf(laterDone));
    expect(await executions(later)).toHaveLength(1);
  });
});

describeOnPostgres('the LISTEN connection of an app', () => {
  it('is closed when the app closes', async () => {
    const appName = runTag('wait_close');
    const database = sharedDatabase!;
    const fixture = await createFixtureApp(
      { ...database, options: () => ({ ...database.options(), applicationName: appName }) },
      { waitPollInterval: '60s' },
    );
    const listening = () =>
      fixture.dataSource.query(
        `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'`,
        [appName],
      );
    const observer = new DataSource(database.options());
    await observer.initialize();
    let closed = false;
    try {
      const key = randomUUID();
      fixture.gate.hold(key);
      // supertest sends on `then`: start both requests now.
      const original = post(fixture.http, '/slow-wait', key).then((response) => response);
      await fixture.gate.arrived(key);
      const waiter = post(fixture.http, '/slow-wait', key).then((response) => response);
      await waitFor('the LISTEN connection', async () =>
        (await listening()).length === 1 ? true : undefined,
      );
      fixture.gate.open(key);
      const [done, replay] = await Promise.all([original, waiter]);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(done.body);

      await fixture.close();
      closed = true;
      const stillListening = () =>
        observer.query(
          `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'`,
          [appName],
        );
      await waitFor('the LISTEN backend to go', async () =>
        (await stillListening()).length === 0 ? true : undefined,
      );
    } finally {
      if (!closed) await fixture.close();
      await observer.destroy();
    }
  });
  it('while it cannot connect, waiters poll and get their answer; it connects once it can', async () => {
    // A role allowed exactly as many connections as the app's pool keeps open: the LISTEN
    // connection is refused ("too many connections for role") until the limit is raised.
    const role = runTag('wait_role');
    const admin = new DataSource(sharedDatabase!.options());
    await admin.initialize();
    await admin.query(`CREATE ROLE ${role} LOGIN CONNECTION LIMIT 2`);
    await admin.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_records TO ${role}`);
    const url = new URL((sharedDatabase!.options() as { url: string }).url);
    url.username = role;
    const listeningAs = async () =>
      (await admin.query(
        `SELECT pid FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'LISTEN%'`,
        [role],
      )) as unknown[];
    const fixture = await createFixtureApp(
      {
        ...sharedDatabase!,
        options: () => ({
          type: 'postgres',
          url: url.toString(),
          extra: { max: 2, idleTimeoutMillis: 0 },
        }),
      },
      { waitPollInterval: '20ms', runMigrations: false },
    );
    const logged = collectLogs();
    try {
      // Both pooled connections open, so the role is at its limit.
      await Promise.all([0, 1].map(() => fixture.dataSource.query('SELECT pg_sleep(0.05)')));

      const key = randomUUID();
      fixture.gate.hold(key);
      const original = post(fixture.http, '/slow-wait', key).then((response) => response);
      await fixture.gate.arrived(key);
      const waiter = post(fixture.http, '/slow-wait', key).then((response) => response);
      // The waiter opens the LISTEN connection, which is refused: from now on it polls.
      await waitFor('the refused LISTEN connection', () =>
        logged.some((line) => line.startsWith('Could not open the LISTEN connection'))
          ? true
          : undefined,
      );
      fixture.gate.open(key);
      const [done, replay] = await Promise.all([original, waiter]);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(done.body);
      expect(await listeningAs()).toHaveLength(0);

      await admin.query(`ALTER ROLE ${role} CONNECTION LIMIT 3`);
      await waitFor(
        'the LISTEN connection',
        async () => ((await listeningAs()).length === 1 ? true : undefined),
        { timeoutMs: 20_000, intervalMs: 100 },
      );
    } finally {
      Logger.overrideLogger(false);
      await fixture.close();
      await admin.query(`DROP OWNED BY ${role}`);
      await admin.query(`DROP ROLE ${role}`);
      await admin.destroy();
    }
  });
});

/** Collects the messages of every Nest Logger from now on (the fixture app logs nothing itself). */
function collectLogs(): string[] {
  const logged: string[] = [];
  const collect = (message: unknown) => void logged.push(String(message));
  Logger.overrideLogger({
    log: collect,
    warn: collect,
    error: collect,
    debug: collect,
    verbose: collect,
  });
  return logged;
}
