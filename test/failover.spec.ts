import { randomInt } from 'node:crypto';
import { DataSource } from 'typeorm';
import { createEffectsTables } from './support/effects.js';
import { HttpClient, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { havePostgresTools, PgCluster } from './support/pg-cluster.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { inParallel, report, runTag, tally, waitFor } from './support/reliability.js';
import { TcpProxy } from './support/tcp-proxy.js';

/**
 * A primary and a streaming standby of the test's own (made with the machine's PostgreSQL tools),
 * several app processes reaching "the database" through a TCP proxy (as through a virtual IP or a
 * DNS name), a storm of retried requests to a transactional route, and mid-storm: the primary
 * crashes (pg_ctl -m immediate), the standby is promoted, the proxy sends new connections to it.
 *
 * - Requests during the switch get a 503 problem (store-unavailable) or a 409 (a claim taken just
 *   before the crash, until its lease runs out); never a 500, and never a handler run without a
 *   claim: the effect row commits in the handler's transaction with the stored response.
 * - Afterwards every key is retried until it answers: no key has two effects.
 * - Synchronous replication: a response a client got is never lost, the retry replays it.
 *   Asynchronous: the commits the standby had not received when the primary died are gone; such a
 *   key runs again on the new primary (once), so a client that had its first response sees another.
 * - Restart: the primary crashes and comes back from its own WAL (crash recovery, no standby):
 *   nothing a client got is lost, and the keys in flight at the crash run once after it.
 */
const PROCESSES = 3;
const KEYS = 240;
const COPIES = 3;
const IN_FLIGHT = 24;
/** The failover starts once this many requests were answered. */
const SWITCH_AFTER = 250;

const describeFailover = havePostgresTools ? describe : describe.skip;
if (!havePostgresTools) console.warn('[failover] SKIPPED: no PostgreSQL tools (initdb, pg_ctl)');

describeFailover.each([
  ['failover to a promoted standby, synchronous replication', 'synchronous'],
  ['failover to a promoted standby, asynchronous replication', 'asynchronous'],
  ['the primary crashes and restarts (recovery from its own WAL)', 'restart'],
] as const)('%s', (_title, mode) => {
  const tag = runTag('failover');
  const tenant = { 'X-Tenant': tag };
  let primary: PgCluster;
  /** None when the primary restarts. */
  let standby: PgCluster | undefined;
  let proxy: TcpProxy;
  let processes: AppProcess[] = [];
  let clients: HttpClient[] = [];

  beforeAll(async () => {
    primary = await PgCluster.primary(
      mode === 'synchronous' ? { synchronousStandby: 'standby1' } : {},
    );
    standby = mode === 'restart' ? undefined : await PgCluster.standbyOf(primary, 'standby1');
    const admin = await new DataSource({ type: 'postgres', url: primary.url }).initialize();
    try {
      if (standby)
        await waitFor(
          'the standby to stream',
          async () => {
            const [row] = await admin.query(
              `SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1' AND state = 'streaming'`,
            );
            return row && (mode === 'asynchronous' || row.sync_state === 'sync') ? true : undefined;
          },
          { timeoutMs: 30_000 },
        );
      await createEffectsTables(admin, tag);
    } finally {
      await admin.destroy();
    }
    proxy = await TcpProxy.start({ host: '127.0.0.1', port: primary.port });
    processes = await Promise.all(
      Array.from({ length: PROCESSES }, () =>
        startAppProcess('test/fixtures/storm-server.js', {
          DATABASE_URL: proxy.proxiedUrl(primary.url),
          EFFECTS_TABLE: tag,
          STORE_TIMEOUT: '3s',
          CRASH_LOCK_TIMEOUT: '2s',
          POOL_MAX: '8',
          CONNECT_TIMEOUT_MS: '2000',
        }),
      ),
    );
    clients = processes.map((p) => new HttpClient(p.baseUrl, IN_FLIGHT));
  }, 120_000);

  afterAll(async () => {
    clients.forEach((client) => client.close());
    await Promise.all(processes.map((p) => p.stop()));
    await proxy?.close();
    await primary?.remove();
    await standby?.remove();
  });

  it('answers 503 during the switch, runs nothing without a claim, and leaves no key with two effects', async () => {
    const keys = Array.from({ length: KEYS }, (_, i) => `${tag}-${i}`);
    // Each key's copies are spread over the storm, so keys straddle the switch.
    const plan = Array.from({ length: COPIES }, () => keys).flat();
    const post = (key: string) =>
      clients[randomInt(PROCESSES)].post(
        '/points/transactional',
        key,
        { amount: 1 },
        tenant,
        30_000,
      );
    let answered = 0;
    let switched: Promise<void> | undefined;
    const failover = async () => {
      await primary.crash();
      await proxy.cut();
      if (standby) {
        await standby.promote();
        proxy.retarget({ host: '127.0.0.1', port: standby.port });
      } else {
        await primary.start();
      }
      await proxy.restore();
    };
    const sent: { key: string; exchange: Exchange }[] = await inParallel(
      IN_FLIGHT,
      plan.map((key) => async () => {
        const exchange = await post(key);
        if (++answered === SWITCH_AFTER) switched = failover();
        return { key, exchange };
      }),
    );
    await switched;

    // Afterwards each key is sent until it answers 201 (a 409 waits for a lease of the dead
    // primary's to run out, a 503 for a pool to reconnect).
    const finals = new Map<string, Exchange>();
    await inParallel(
      IN_FLIGHT,
      keys.map((key) => async () => {
        for (let attempt = 0; attempt < 60; attempt++) {
          const exchange = await post(key);
          if (exchange.status === 201) return void finals.set(key, exchange);
          await new Promise((resolve) => setTimeout(resolve, 250));
        }
        throw new Error(`${key} never answered 201`);
      }),
    );

    const db = await new DataSource({
      type: 'postgres',
      url: (standby ?? primary).url,
    }).initialize();
    let effects: { idempotency_key: string; executions: string; id: string }[];
    let completed: { idempotency_key: string; response_body: string }[];
    try {
      effects = await db.query(
        `SELECT idempotency_key, count(*) AS executions, min(id) AS id FROM ${tag} GROUP BY idempotency_key`,
      );
      completed = await db.query(
        `SELECT idempotency_key, response_body FROM idempotency_records WHERE scope = $1 AND state = 'completed'`,
        [tag],
      );
    } finally {
      await db.destroy();
    }

    const statuses = tally(
      sent.map(({ exchange }) =>
        exchange.error ? `no response (${exchange.error})` : exchange.status,
      ),
    );
    const failures = sent.filter(({ exchange }) => exchange.status !== 201);
    const problems = failures.map(({ exchange }) => jsonOf(exchange)?.type ?? exchange.status);
    // A 201 a client saw during the storm whose effect is not the one the key has now: a
    // response lost with the commits the standby never received.
    const effectOf = new Map(effects.map((row) => [row.idempotency_key, Number(row.id)]));
    const lost = new Set(
      sent
        .filter(({ exchange }) => exchange.status === 201)
        .filter(({ key, exchange }) => jsonOf(exchange).effect !== effectOf.get(key))
        .map(({ key }) => key),
    );
    report(
      `${mode === 'restart' ? 'crash and restart' : `failover, ${mode} replication`}: ${PROCESSES} processes, ${KEYS} keys × ${COPIES}`,
      {
        requests: sent.length,
        statuses: JSON.stringify(statuses),
        'problems during the switch': JSON.stringify(tally(problems)),
        'handler executions (effect rows)': effects.reduce(
          (n, row) => n + Number(row.executions),
          0,
        ),
        'keys executed more than once': effects.filter((row) => Number(row.executions) > 1).length,
        'keys whose first response was lost': lost.size,
        'final answers replayed': [...finals.values()].filter(isReplay).length,
      },
    );

    // Never a 500; what is not a 201 is a 503 (store unavailable), a 409 (in progress) or no
    // response at all (the request was in flight on a connection the crash cut).
    expect(failures.filter(({ exchange }) => ![0, 409, 503].includes(exchange.status))).toEqual([]);
    for (const { exchange } of failures.filter(({ exchange }) => exchange.status === 503)) {
      expect(exchange.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(jsonOf(exchange).type).toMatch(/store-unavailable$/);
    }
    expect(failures.some(({ exchange }) => exchange.status === 503)).toBe(true);
    // Each key: one effect, the one its stored response names, and that is what a retry gets.
    expect(effects.filter((row) => Number(row.executions) > 1)).toEqual([]);
    expect(effects).toHaveLength(KEYS);
    const storedEffect = new Map(
      completed.map((row) => [row.idempotency_key, JSON.parse(row.response_body).effect]),
    );
    for (const key of keys) {
      expect(storedEffect.get(key)).toBe(effectOf.get(key));
      expect(jsonOf(finals.get(key)!).effect).toBe(effectOf.get(key));
    }
    if (mode !== 'asynchronous') expect([...lost]).toEqual([]);
  }, 240_000);
});
