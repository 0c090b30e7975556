import { randomInt, randomUUID } from 'node:crypto';
import type { DataSource } from 'typeorm';
import { HttpClient, isReplay, type Exchange } from './support/http-client.js';
import type { AppProcess } from './support/processes.js';
import {
  describeOnPostgres,
  latencySummary,
  report,
  runTag,
  SOAK,
  tally,
} from './support/reliability.js';
import { startRun, tearDownRun } from './support/storm.js';

/**
 * Eight app processes on one PostgreSQL, a steady stream of new keys (each sent twice, to two
 * processes at once) for a while, with a short TTL and the purge running: the table must stay the
 * same size while keys keep coming. SOAK=1 runs it for SOAK_MINUTES (default 5) and prints the
 * figures the README's "Running in production" quotes; without it, 20 s prove the same properties.
 */
const PROCESSES = 8;
/** Keys in flight; fewer in `npm test`, where the soak shares the cores with the other specs. */
const IN_FLIGHT = SOAK ? 48 : 16;
const DURATION_MS = SOAK ? Number(process.env.SOAK_MINUTES ?? 5) * 60_000 : 20_000;
const TTL_MS = SOAK ? 30_000 : 4_000;
const PURGE_INTERVAL_MS = SOAK ? 5_000 : 1_000;
/** How often the table's size is read. */
const SAMPLE_MS = SOAK ? 10_000 : 2_000;

describeOnPostgres(`an ${PROCESSES}-process soak`, (url) => {
  const tag = runTag('soak');
  const tenant = { 'X-Tenant': tag };
  let processes: AppProcess[] = [];
  let clients: HttpClient[] = [];
  let db: DataSource;

  beforeAll(async () => {
    ({ db, processes } = await startRun({
      url,
      tag,
      count: PROCESSES,
      env: {
        TTL: `${TTL_MS}ms`,
        PURGE_INTERVAL: `${PURGE_INTERVAL_MS}ms`,
        STORE_TIMEOUT: '30s',
        POOL_MAX: '6',
      },
    }));
    clients = processes.map((p) => new HttpClient(p.baseUrl, IN_FLIGHT));
  }, 120_000);

  afterAll(() => tearDownRun({ clients, processes, db, tag }));

  it(
    `keeps every key once and the table steady for ${DURATION_MS / 1000} s of new keys under the purge`,
    async () => {
      const started = Date.now();
      const deadline = started + DURATION_MS;
      const latencies: number[] = [];
      const statuses: (number | string)[] = [];
      let keys = 0;
      let duplicatesReplayedOr409 = 0;
      const sizes: { atS: number; rows: number }[] = [];

      const sampler = (async () => {
        while (Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, SAMPLE_MS));
          const [{ rows }] = await db.query(
            'SELECT count(*)::int AS rows FROM idempotency_records WHERE scope = $1',
            [tag],
          );
          sizes.push({ atS: Math.round((Date.now() - started) / 1000), rows });
        }
      })();

      const send = (client: HttpClient, key: string, amount: number): Promise<Exchange> =>
        client.post('/effects', key, { amount }, tenant, 60_000);
      // IN_FLIGHT loops, each sending a new key to two processes at once, until the deadline.
      await Promise.all(
        Array.from({ length: IN_FLIGHT }, async () => {
          while (Date.now() < deadline) {
            const key = randomUUID();
            const first = randomInt(PROCESSES);
            const second = (first + 1 + randomInt(PROCESSES - 1)) % PROCESSES;
            const amount = keys++;
            const pair = await Promise.all([
              send(clients[first], key, amount),
              send(clients[second], key, amount),
            ]);
            for (const exchange of pair) {
              latencies.push(exchange.elapsedMs);
              statuses.push(exchange.error ? `no response (${exchange.error})` : exchange.status);
            }
            if (pair.some((e) => e.status === 409 || (e.status === 201 && isReplay(e)))) {
              duplicatesReplayedOr409++;
            }
          }
        }),
      );
      await sampler;
      const seconds = (Date.now() - started) / 1000;

      const [{ executions, twice }] = await db.query(
        `SELECT count(*)::int AS executions, count(*) FILTER (WHERE n > 1)::int AS twice
         FROM (SELECT idempotency_key, count(*) AS n FROM ${tag} GROUP BY idempotency_key) per_key`,
      );
      const firstHalf = sizes.filter((s) => s.atS <= DURATION_MS / 2000 && s.atS * 1000 > TTL_MS);
      const secondHalf = sizes.filter((s) => s.atS > DURATION_MS / 2000);
      const peak = (samples: typeof sizes) => Math.max(0, ...samples.map((s) => s.rows));
      const keysPerSecond = keys / seconds;
      report(`soak: ${PROCESSES} processes, ${IN_FLIGHT} keys in flight, TTL ${TTL_MS / 1000} s`, {
        duration: `${seconds.toFixed(0)} s`,
        keys: keys,
        'keys per second (each sent twice)': keysPerSecond.toFixed(0),
        'requests per second': (statuses.length / seconds).toFixed(0),
        latency: latencySummary(latencies),
        statuses: JSON.stringify(tally(statuses)),
        'keys whose duplicate got 409 or the replay': duplicatesReplayedOr409,
        'handler executions': executions,
        'keys executed more than once': twice,
        'records table (rows of this run), sampled': sizes
          .map((s) => `${s.atS}s:${s.rows}`)
          .join(' '),
        'peak rows, first half / second half': `${peak(firstHalf)} / ${peak(secondHalf)}`,
      });

      expect(statuses.filter((status) => typeof status !== 'number' || status >= 500)).toEqual([]);
      expect(twice).toBe(0);
      expect(executions).toBe(keys);
      // Steady: rows live for the TTL plus at most a purge interval and a purge's run, so the table
      // holds about keys/s × (TTL + interval); it must not grow from the first half to the second.
      const bound = keysPerSecond * ((TTL_MS + PURGE_INTERVAL_MS) / 1000) * 1.5 + 500;
      expect(peak(secondHalf)).toBeLessThan(bound);
      expect(peak(secondHalf)).toBeLessThan(Math.max(peak(firstHalf), 1) * 1.5 + 500);
    },
    DURATION_MS + 180_000,
  );
});
