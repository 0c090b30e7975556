import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { createEffectsTables, dropEffectsTables } from './support/effects.js';
import { HttpClient, isProblem, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import {
  describeOnPostgres,
  latencySummary,
  report,
  runTag,
  tally,
  waitFor,
} from './support/reliability.js';
import { TcpProxy } from './support/tcp-proxy.js';

/** The store's timeout in the app under test: a claim that takes longer answers 503. */
const STORE_TIMEOUT_MS = 500;
/** How long a claim that landed late (after its 503) keeps its key locked. */
const LOCK_TIMEOUT_MS = 2000;
/** A request not answered by then counts as hung. */
const CLIENT_DEADLINE_MS = 10 * STORE_TIMEOUT_MS;
const WORKERS = 12;

interface Attempt {
  readonly key: string;
  readonly attempt: string;
  readonly phase: 'before' | 'outage' | 'after';
  readonly exchange: Exchange;
  readonly answeredAt: number;
}

type Outage = 'cut' | 'blackhole';

describeOnPostgres('the idempotency store behind a failing network', (url) => {
  const tag = runTag('outage');
  let db: DataSource;
  const proxies = new Map<Outage, TcpProxy>();
  const apps = new Map<Outage, AppProcess>();
  const clients = new Map<Outage, HttpClient>();

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
    await createEffectsTables(db, tag);
    const target = new URL(url);
    await Promise.all(
      (['cut', 'blackhole'] as const).map(async (outage) => {
        const proxy = await TcpProxy.start({
          host: target.hostname,
          port: Number(target.port || 5432),
        });
        proxies.set(outage, proxy);
        const app = await startAppProcess('test/fixtures/storm-server.js', {
          DATABASE_URL: proxy.proxiedUrl(url),
          EFFECTS_DATABASE_URL: url, // the side effect (a payment gateway, say) stays reachable
          EFFECTS_TABLE: tag,
          STORE_TIMEOUT: `${STORE_TIMEOUT_MS}ms`,
          LOCK_TIMEOUT: `${LOCK_TIMEOUT_MS}ms`,
          // pg waits forever for a new connection by default; through a blackhole that would queue
          // claims until the network heals, each landing late and locking its key until lockTimeout.
          CONNECT_TIMEOUT_MS: String(STORE_TIMEOUT_MS),
        });
        apps.set(outage, app);
        clients.set(outage, new HttpClient(app.baseUrl, WORKERS + 4));
      }),
    );
  }, 60_000);

  afterAll(async () => {
    for (const client of clients.values()) client.close();
    await Promise.all([...apps.values()].map((app) => app.stop()));
    await Promise.all([...proxies.values()].map((proxy) => proxy.close()));
    if (db?.isInitialized) {
      await dropEffectsTables(db, tag);
      await db.query('DELETE FROM idempotency_records WHERE scope = $1', [tag]);
      await db.destroy();
    }
  });

  it.each([
    ['cut', 'connections destroyed, new ones refused'],
    ['blackhole', 'connections accepted and held, nothing answered'],
  ] as const)(
    '%s (%s): 503 while down, the handler never runs without a claim, every key completes once after',
    async (outage, _description) => {
      const proxy = proxies.get(outage)!;
      const app = apps.get(outage)!;
      const client = clients.get(outage)!;
      const scope = `${tag}_${outage}`;
      let phase: Attempt['phase'] = 'before';
      const attempts: Attempt[] = [];
      const send = async (key: string) => {
        const attempt = randomUUID();
        const exchange = await client.post(
          '/effects',
          key,
          { amount: 1, note: 'outage' },
          { 'X-Tenant': scope, 'X-Attempt': attempt },
          CLIENT_DEADLINE_MS,
        );
        // An attempt belongs to the phase it was answered in.
        const record: Attempt = { key, attempt, phase, exchange, answeredAt: Date.now() };
        attempts.push(record);
        return record;
      };

      // Keys completed before the outage, to replay during and after it.
      const earlier = Array.from({ length: 5 }, () => randomUUID());
      const originals = new Map<string, unknown>();
      for (const key of earlier) {
        const { exchange } = await send(key);
        expect(exchange.status).toBe(201);
        originals.set(key, jsonOf(exchange));
      }

      // Clients that retry each key until it succeeds: new keys keep coming through the outage.
      let stopping = false;
      const completedAfterRestore: string[] = [];
      const started: string[] = [];
      const worker = async () => {
        while (!stopping) {
          const key = randomUUID();
          started.push(key);
          const giveUpAt = Date.now() + 60_000;
          for (;;) {
            const { exchange } = await send(key);
            if (exchange.status === 201) {
              if (phase === 'after') completedAfterRestore.push(key);
              break;
            }
            if (Date.now() > giveUpAt) throw new Error(`key ${key} never completed`);
            // A tight retry loop, the worst case for the server: 50 ms after a 503, 100 ms after a 409.
            await new Promise((resolve) => setTimeout(resolve, exchange.status === 409 ? 100 : 50));
          }
        }
      };
      const workers = Array.from({ length: WORKERS }, worker);
      await waitFor('keys to complete before the outage', () =>
        attempts.length >= 40 ? true : undefined,
      );

      phase = 'outage';
      if (outage === 'cut') await proxy.cut();
      else proxy.blackhole();
      // The outage lasts until every worker has been refused a few times.
      await waitFor(
        '503s during the outage',
        () =>
          attempts.filter((a) => a.phase === 'outage' && a.exchange.status === 503).length >=
          WORKERS * 3
            ? true
            : undefined,
        { timeoutMs: 30_000 },
      );
      const duringOutage = await Promise.all(earlier.map((key) => send(key)));
      expect(app.child.exitCode).toBeNull();
      await proxy.restore();
      phase = 'after';
      const restoredAt = Date.now();
      // Recovery: every worker completes fresh keys again.
      await waitFor(
        'keys to complete after the restore',
        () => (completedAfterRestore.length >= WORKERS * 3 ? true : undefined),
        { timeoutMs: 30_000 },
      );
      stopping = true;
      await Promise.all(workers);
      const afterRestore = await Promise.all(earlier.map((key) => send(key)));

      // The store was unreachable: every answer during the outage is a 503 problem, or (for a request
      // claimed just before the cut) the handler's own 201; none hung past the client's deadline.
      const outageAttempts = attempts.filter((a) => a.phase === 'outage');
      for (const { exchange } of outageAttempts) {
        expect(exchange.error).toBeUndefined();
        if (exchange.status === 201) continue;
        expect(exchange.status).toBe(503);
        expect(isProblem(exchange)).toBe(true);
        expect(jsonOf(exchange).type).toBe('tag:nestjs-idempotency,2026:store-unavailable');
        expect(exchange.headers['retry-after']).toBe('1');
      }
      for (const { exchange } of duringOutage) expect(exchange.status).toBe(503);
      expect(attempts.filter((a) => a.exchange.status >= 500 && a.exchange.status !== 503)).toEqual(
        [],
      );
      expect(attempts.filter((a) => a.exchange.error)).toEqual([]);

      // The handler never ran for an attempt answered 503 (no claim, no run)...
      const effects: { idempotency_key: string; attempt: string | null }[] = await db.query(
        `SELECT idempotency_key, attempt FROM ${tag} WHERE idempotency_key = ANY($1)`,
        [[...started, ...earlier]],
      );
      const refused = new Set(
        attempts.filter((a) => a.exchange.status === 503).map((a) => a.attempt),
      );
      expect(effects.filter((effect) => refused.has(effect.attempt!))).toEqual([]);
      // ...and every key ran exactly once, its 201 being the original or a replay of it.
      const executionsOf = tally(effects.map((effect) => effect.idempotency_key));
      for (const key of started) expect([key, executionsOf[key]]).toEqual([key, 1]);
      for (const key of earlier) expect(executionsOf[key]).toBe(1);
      for (const [index, key] of earlier.entries()) {
        expect(afterRestore[index].exchange.status).toBe(201);
        expect(isReplay(afterRestore[index].exchange)).toBe(true);
        expect(jsonOf(afterRestore[index].exchange)).toEqual(originals.get(key));
      }
      // The process stayed up and serves.
      expect(app.child.exitCode).toBeNull();
      expect((await client.send('/health', { method: 'GET' })).status).toBe(200);

      const byKey = new Map<string, Attempt[]>();
      for (const a of attempts) byKey.set(a.key, [...(byKey.get(a.key) ?? []), a]);
      const straddling = [...byKey.values()].filter(
        (list) =>
          list.some((a) => a.exchange.status === 503) && list.at(-1)!.exchange.status === 201,
      );
      const stuck = [...byKey.values()].filter((list) =>
        list.some((a) => a.phase === 'after' && a.exchange.status === 409),
      );
      const refusedLatencies = attempts
        .filter((a) => a.exchange.status === 503)
        .map((a) => a.exchange.elapsedMs);
      report(
        `database outage (${outage}) through a TCP proxy, storeTimeout ${STORE_TIMEOUT_MS} ms`,
        {
          requests: attempts.length,
          keys: byKey.size,
          statuses: JSON.stringify(tally(attempts.map((a) => a.exchange.status))),
          'statuses answered during the outage': JSON.stringify(
            tally(outageAttempts.map((a) => a.exchange.status)),
          ),
          'statuses answered after the restore': JSON.stringify(
            tally(attempts.filter((a) => a.phase === 'after').map((a) => a.exchange.status)),
          ),
          '503 latency': latencySummary(refusedLatencies),
          'keys retried across the outage (503, then 201)': straddling.length,
          'attempts those keys took': latencySummary(straddling.map((list) => list.length)).replace(
            / ms/g,
            '',
          ),
          'keys locked after the restore by a claim that landed late (409 until lockTimeout)':
            stuck.length,
          'last of those keys completed': `${Math.max(0, ...straddling.map((list) => list.at(-1)!.answeredAt - restoredAt))} ms after the restore`,
          'handler runs for 503 answers': effects.filter((effect) => refused.has(effect.attempt!))
            .length,
          'keys executed more than once': Object.values(executionsOf).filter((n) => n > 1).length,
          'pg connections through the proxy': proxy.counts.accepted,
        },
      );
    },
    120_000,
  );
});
