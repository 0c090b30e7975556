import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { createEffectsTables } from './support/effects.js';
import { HttpClient, isReplay, jsonOf } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import {
  describeOnPostgres,
  inParallel,
  latencySummary,
  report,
  runTag,
  SOAK,
  soakFactor,
  tally,
  waitFor,
} from './support/reliability.js';
import {
  createIsolatedSchema,
  fireStorm,
  metricsOf,
  planStorm,
  stormBody,
  type StormRoute,
} from './support/storm.js';

const PROCESSES = 4;
const EFFECTS = 'effects';

/** A storm's processes on a schema of their own, with the test's connection to it. */
interface StormRig {
  readonly db: DataSource;
  readonly processes: AppProcess[];
  readonly clients: HttpClient[];
  close(): Promise<void>;
}

async function startRig(
  url: string,
  tag: string,
  env: Record<string, string>,
  inFlight: number,
): Promise<StormRig> {
  const admin = new DataSource({ type: 'postgres', url });
  await admin.initialize();
  const schema = await createIsolatedSchema(admin, url, tag);
  const db = new DataSource({ type: 'postgres', url: schema.url });
  await db.initialize();
  await createEffectsTables(db, EFFECTS);
  const started = await Promise.allSettled(
    Array.from({ length: PROCESSES }, () =>
      startAppProcess('test/fixtures/storm-server.js', {
        DATABASE_URL: schema.url,
        EFFECTS_TABLE: EFFECTS,
        // As in storm.spec: on two shared cores a request can queue for seconds; a 503 for a slow
        // store is db-outage.spec's subject, not this one's.
        STORE_TIMEOUT: '30s',
        POOL_MAX: '10',
        ...env,
      }),
    ),
  );
  const processes = started.flatMap((result) =>
    result.status === 'fulfilled' ? [result.value] : [],
  );
  const failed = started.find((result) => result.status === 'rejected');
  if (failed) {
    // Leave nothing behind: stop the ones that did start.
    await Promise.all(processes.map((p) => p.stop()));
    await db.destroy();
    await schema.drop();
    await admin.destroy();
    throw failed.reason;
  }
  const clients = processes.map((p) => new HttpClient(p.baseUrl, inFlight));
  return {
    db,
    processes,
    clients,
    async close() {
      clients.forEach((client) => client.close());
      await Promise.all(processes.map((p) => p.stop()));
      await db.destroy();
      await schema.drop();
      await admin.destroy();
    },
  };
}

const count = async (db: DataSource, sql: string, params: unknown[] = []) =>
  Number((await db.query(sql, params))[0].count);

describeOnPostgres('the purge during storms', (url) => {
  it('deletes expired rows while a storm runs, and no live row: every key executes once and replays its original', async () => {
    const PURGE_INTERVAL_MS = 200;
    const PURGE_BATCH_SIZE = 50;
    const REQUESTS = 4_000 * soakFactor;
    const IN_FLIGHT = 100;
    /** Unrelated rows whose expiry is spread from 2 s ago to SPREAD_MS from the storm's start. */
    const OLD_ROWS = 20_000 * soakFactor;
    const SPREAD_MS = SOAK ? 30_000 : 5_000;
    const tag = runTag('purge_storm');
    const rig = await startRig(
      url,
      tag,
      { PURGE_INTERVAL: `${PURGE_INTERVAL_MS}ms`, PURGE_BATCH_SIZE: String(PURGE_BATCH_SIZE) },
      IN_FLIGHT,
    );
    try {
      const { db, clients, processes } = rig;
      const routeOf = (i: number): StormRoute => (i % 4 === 3 ? 'effects-wait' : 'effects');
      const { plan, keys } = planStorm({
        requests: REQUESTS,
        processes: PROCESSES,
        copies: [2, 4, 4, 8],
        routeOf,
      });

      const startedAt = Date.now();
      await db.query(
        `INSERT INTO idempotency_records (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
           expires_at, created_at, response_status, response_headers, response_body, response_body_encoding)
         SELECT $1, 'POST /effects', 'old-' || i, repeat('0', 64), 'completed', gen_random_uuid()::text,
           $2::bigint - 2000 + (i * ($3::bigint + 2000)) / $4::int, $2::bigint - 86400000, 201, '{}', '{"old":true}', 'json'
         FROM generate_series(1, $4::int) AS i`,
        [`${tag}_old`, startedAt, SPREAD_MS, OLD_ROWS],
      );
      // Every other storm key has an earlier life: a completed row of another payload, expired a
      // moment ago. Its first claim takes it over, unless the purge deletes it first; either way the
      // old response must never come back (live, it would be a 422).
      const staleIndexes = keys.map((_, i) => i).filter((i) => i % 2 === 0);
      const staleKeys = staleIndexes.map((i) => keys[i]);
      await db.query(
        `INSERT INTO idempotency_records (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
           expires_at, created_at, response_status, response_headers, response_body, response_body_encoding)
         SELECT $1, 'POST /' || route, key, repeat('f', 64), 'completed', gen_random_uuid()::text,
           $4::bigint - 1, $4::bigint - 86400000, 201, '{}', '{"stale":true}', 'json'
         FROM unnest($2::text[], $3::text[]) AS t(key, route)`,
        [tag, staleKeys, staleIndexes.map(routeOf), Date.now()],
      );
      const oldRowsAt = (label: string) =>
        count(db, 'SELECT count(*) FROM idempotency_records WHERE scope = $1', [`${tag}_old`]).then(
          (n) => ({ label, n }),
        );
      const before = await metricsOf(clients);
      const oldBefore = await oldRowsAt('storm start');

      const started = performance.now();
      const sent = await fireStorm(clients, plan, { inFlight: IN_FLIGHT, tenant: tag });
      const stormSeconds = (performance.now() - started) / 1000;
      const during = await metricsOf(clients);
      const oldAfterStorm = await oldRowsAt('storm end');

      // Every key again, after the storm: each replays its original.
      const after = await inParallel(
        IN_FLIGHT,
        keys.map(
          (key, index) => async () =>
            clients[index % PROCESSES].post(
              `/${routeOf(index)}`,
              key,
              stormBody(index),
              { 'X-Tenant': tag },
              120_000,
            ),
        ),
      );
      // The rest of the old rows expire by SPREAD_MS after the start; the purge then removes them.
      await waitFor(
        'the purge to delete every expired row',
        async () =>
          (await count(db, 'SELECT count(*) FROM idempotency_records WHERE scope = $1', [
            `${tag}_old`,
          ])) === 0
            ? true
            : undefined,
        { timeoutMs: SPREAD_MS + 30_000, intervalMs: PURGE_INTERVAL_MS },
      );
      const final = await metricsOf(clients);

      const executions: { idempotency_key: string; n: string }[] = await db.query(
        `SELECT idempotency_key, count(*) AS n FROM ${EFFECTS} GROUP BY idempotency_key`,
      );
      const records: { idempotency_key: string; state: string; response_body: string }[] =
        await db.query(
          'SELECT idempotency_key, state, response_body FROM idempotency_records WHERE scope = $1',
          [tag],
        );
      const originals = sent.filter((s) => s.exchange.status === 201 && !isReplay(s.exchange));
      const originalOf = new Map(originals.map((s) => [s.key, jsonOf(s.exchange)]));
      report(
        `purge during a storm: ${PROCESSES} processes × ${IN_FLIGHT} in flight on PostgreSQL, purge every ${PURGE_INTERVAL_MS} ms in batches of ${PURGE_BATCH_SIZE}`,
        {
          requests: sent.length,
          keys: keys.length,
          'storm keys with an expired earlier row': staleKeys.length,
          'expired rows seeded besides (expiring over the storm)': OLD_ROWS,
          statuses: JSON.stringify(
            tally(
              sent.map((s) =>
                s.exchange.error ? `no response (${s.exchange.error})` : s.exchange.status,
              ),
            ),
          ),
          'handler executions': executions.reduce((sum, row) => sum + Number(row.n), 0),
          'rows purged while the storm ran': (during.purged ?? 0) - (before.purged ?? 0),
          'old rows left at storm start / end': `${oldBefore.n} / ${oldAfterStorm.n}`,
          'expired rows taken over by a claim (not purged first)': final.expired ?? 0,
          'rows purged in all': final.purged ?? 0,
          'storm duration': `${stormSeconds.toFixed(1)} s`,
          latency: latencySummary(sent.map((s) => s.exchange.elapsedMs)),
          'retry per key after the storm': `${after.length}, ${after.filter((e) => e.status === 201 && isReplay(e)).length} replayed the original`,
        },
      );

      // No request failed.
      expect(sent.filter((s) => s.exchange.error || s.exchange.status >= 500)).toEqual([]);
      for (const s of sent) {
        if (s.exchange.status === 409) expect(s.route).toBe('effects');
        else expect(s.exchange.status).toBe(201);
      }
      // Once per key, and the old responses never came back.
      expect(executions).toHaveLength(keys.length);
      expect(executions.filter((row) => Number(row.n) !== 1)).toEqual([]);
      expect(originalOf.size).toBe(keys.length);
      for (const s of sent)
        if (s.exchange.status === 201) expect(jsonOf(s.exchange)).toEqual(originalOf.get(s.key));
      // No live row was deleted: every key replays its original, from a completed row.
      after.forEach((exchange, index) => {
        expect([keys[index], exchange.status, isReplay(exchange)]).toEqual([
          keys[index],
          201,
          true,
        ]);
        expect(jsonOf(exchange)).toEqual(originalOf.get(keys[index]));
      });
      expect(records).toHaveLength(keys.length);
      for (const record of records) {
        expect(record.state).toBe('completed');
        expect(JSON.parse(record.response_body)).toEqual(originalOf.get(record.idempotency_key));
      }
      // The purge ran while requests were in flight, and the expired rows are gone.
      expect((during.purged ?? 0) - (before.purged ?? 0)).toBeGreaterThan(0);
      expect((final.purged ?? 0) + (final.expired ?? 0)).toBeGreaterThanOrEqual(
        OLD_ROWS + staleKeys.length,
      );
      // No lost lease (a purged in-progress row would show as one), no failed write.
      for (const p of processes) expect(p.output()).not.toMatch(/ERROR|WARN/);
    } finally {
      await rig.close();
    }
  }, 600_000);

  it('keeps the table bounded in a storm with a short TTL', async () => {
    const TTL_MS = SOAK ? 2_000 : 1_000;
    const PURGE_INTERVAL_MS = SOAK ? 500 : 250;
    const PURGE_BATCH_SIZE = 200;
    const DURATION_MS = SOAK ? 120_000 : 8_000;
    const IN_FLIGHT = 50;
    const SAMPLE_EVERY_MS = 250;
    /**
     * A row lives from its claim (after its request was sent) until the purge after its TTL: its
     * completion (before the response left) + ttl + up to a purge interval + the purge run itself.
     * So a row counted at time t belongs to a request sent by t and answered after t − (ttl +
     * interval + slack); the slack covers the purge run and the count's own query, a few ms each
     * here (one second is far more than either takes even under the storm).
     */
    const SLACK_MS = 1_000;
    const tag = runTag('purge_bound');
    const rig = await startRig(
      url,
      tag,
      {
        TTL: `${TTL_MS}ms`,
        PURGE_INTERVAL: `${PURGE_INTERVAL_MS}ms`,
        PURGE_BATCH_SIZE: String(PURGE_BATCH_SIZE),
      },
      IN_FLIGHT,
    );
    try {
      const { db, clients, processes } = rig;
      const samples: { at: number; rows: number }[] = [];
      const exchanges: {
        status: number;
        error?: string;
        elapsedMs: number;
        sentAt: number;
        answeredAt: number;
      }[] = [];
      const deadline = Date.now() + DURATION_MS;
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          const rows = await count(db, 'SELECT count(*) FROM idempotency_records');
          samples.push({ at: Date.now(), rows });
          await new Promise((resolve) => setTimeout(resolve, SAMPLE_EVERY_MS));
        }
      })();
      let sequence = 0;
      const worker = async (process: number) => {
        while (Date.now() < deadline) {
          const n = sequence++;
          const sentAt = Date.now();
          const exchange = await clients[process].post(
            '/effects',
            randomUUID(),
            stormBody(n),
            { 'X-Tenant': tag },
            120_000,
          );
          exchanges.push({ ...exchange, sentAt, answeredAt: Date.now() });
        }
      };
      const started = Date.now();
      await Promise.all(
        clients.flatMap((_, process) => Array.from({ length: IN_FLIGHT }, () => worker(process))),
      );
      const seconds = (Date.now() - started) / 1000;
      sampling = false;
      await sampler;
      // After the last TTL and purge interval, the table empties.
      await waitFor(
        'the table to empty after the storm',
        async () =>
          (await count(db, 'SELECT count(*) FROM idempotency_records')) === 0 ? true : undefined,
        { timeoutMs: TTL_MS + PURGE_INTERVAL_MS + 20_000, intervalMs: 100 },
      );
      const metrics = await metricsOf(clients);

      const executions = await count(db, `SELECT count(*) FROM ${EFFECTS}`);
      const windowMs = TTL_MS + PURGE_INTERVAL_MS + SLACK_MS;
      // Per sample: the requests whose row may still exist then (see SLACK_MS).
      const mayLive = (t: number) =>
        exchanges.filter((e) => e.sentAt <= t && e.answeredAt > t - windowMs).length;
      const checked = samples.map((s) => ({ ...s, bound: mayLive(s.at) }));
      const keyRate = exchanges.length / seconds;
      const steady = checked.filter((s) => s.at - started > windowMs);
      const maxRows = Math.max(...checked.map((s) => s.rows));
      report(
        `table size in a storm with a short TTL: ${PROCESSES} processes × ${IN_FLIGHT} in flight, ttl ${TTL_MS} ms, purge every ${PURGE_INTERVAL_MS} ms`,
        {
          requests: exchanges.length,
          'new keys (one row each)': exchanges.length,
          duration: `${seconds.toFixed(1)} s`,
          'request rate': `${Math.round(exchanges.length / seconds)}/s`,
          statuses: JSON.stringify(
            tally(exchanges.map((e) => (e.error ? `no response (${e.error})` : e.status))),
          ),
          'row count samples': samples.length,
          'rows, max': maxRows,
          'rows, mean after the first row lifetime': Math.round(
            steady.reduce((sum, s) => sum + s.rows, 0) / Math.max(1, steady.length),
          ),
          'rule of thumb: key rate × (ttl + purge interval) + requests in flight':
            Math.round((keyRate * (TTL_MS + PURGE_INTERVAL_MS)) / 1000) + PROCESSES * IN_FLIGHT,
          'bound per sample: requests sent by then, answered within the last ttl + interval + 1 s': `${Math.min(...checked.map((s) => s.bound))}–${Math.max(...checked.map((s) => s.bound))}`,
          'rows without a purge would reach': exchanges.length,
          'rows purged': metrics.purged ?? 0,
          latency: latencySummary(exchanges.map((e) => e.elapsedMs)),
        },
      );

      expect(exchanges.filter((e) => e.error || e.status !== 201)).toEqual([]);
      expect(executions).toBe(exchanges.length); // one execution per key
      expect(checked.filter((s) => s.rows > s.bound)).toEqual([]);
      // The bound means something: far below what the table would hold without a purge.
      expect(maxRows * 2).toBeLessThan(exchanges.length);
      expect(metrics.purged).toBe(exchanges.length);
      for (const p of processes) expect(p.output()).not.toMatch(/ERROR|WARN/);
    } finally {
      await rig.close();
    }
  }, 600_000);
});
