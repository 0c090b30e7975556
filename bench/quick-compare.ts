/**
 * `npm run bench:quick -- [routes] [rounds] [seconds]`: a few routes of our PostgreSQL (or PGlite)
 * app in alternating rounds, for trying a change in a minute instead of the whole bench's nine.
 * Prints each route's median req/s, p50, ratio to its base (`plain`, or `write` for the realistic
 * handler), CPU per request of the app and of PostgreSQL, and the statements TypeORM sent per request
 * with the rows per batched statement (how much concurrent requests shared their statements).
 *
 *   npm run bench:quick -- plain,first,write,write_first 3 4
 *   BENCH_QUICK_CONNECTIONS=1 npm run bench:quick      # one request at a time: latency, no batches
 *   BENCH_QUICK_DATABASE=pglite npm run bench:quick
 *
 * Routes: plain, pass_through (the handler behind an interceptor that does nothing), first, replay (cycles through `BENCH_REPLAY_KEYS` keys seeded first), write,
 * write_first, write_tx. Not a substitute for `npm run bench`: no peer, no report files.
 */
import { fileURLToPath } from 'node:url';
import { BENCH_CONFIG, ROUTES } from './bench-config.js';
import { startChild } from './child-process.js';
import { cpuPerRequest, cpuSnapshot } from './cpu-usage.js';
import { detectServices, dropSchema, resetSchema } from './environment.js';
import { runLoad, seedKeys, type KeyPlan } from './load.js';
import { ROUTE_PATHS } from './route-rounds.js';
import type { QueryCounts } from './query-counter.js';
import { median } from './stats.js';

const QUICK_ROUTES = [
  'plain',
  'pass_through',
  'first',
  'replay',
  'write',
  'write_first',
  'write_tx',
] as const;
type Route = (typeof QUICK_ROUTES)[number];

const [routeList = 'plain,first', roundsArg = '3', secondsArg = '4'] = process.argv.slice(2);
const routes = routeList.split(',') as Route[];
for (const route of routes) {
  if (!QUICK_ROUTES.includes(route))
    throw new TypeError(`unknown route ${route}; use ${QUICK_ROUTES.join(',')}`);
}
const rounds = Number(roundsArg);
const seconds = Number(secondsArg);
const connections = Number(process.env.BENCH_QUICK_CONNECTIONS ?? BENCH_CONFIG.connections);
const database = process.env.BENCH_QUICK_DATABASE ?? 'postgres';

const services = await detectServices();
if (database === 'postgres') {
  if (!services.postgres) throw new Error(`no PostgreSQL at ${BENCH_CONFIG.databaseUrl}`);
  await resetSchema(BENCH_CONFIG.schema);
}
const app = await startChild({
  name: `app (${database})`,
  script: fileURLToPath(new URL('./app-process.js', import.meta.url)),
  args: [database],
  env: {
    BENCH_DATABASE_URL: BENCH_CONFIG.databaseUrl,
    BENCH_SCHEMA: BENCH_CONFIG.schema,
    BENCH_REDIS_URL: BENCH_CONFIG.redisUrl,
  },
});
const replayKeys = Array.from(
  { length: routes.includes('replay') ? BENCH_CONFIG.replayKeys : 0 },
  (_, i) => `quick-replay-${Date.now()}-${i}`,
);
const keysOf = (route: Route, tag: string): KeyPlan =>
  route === 'plain' || route === 'write' || route === 'pass_through'
    ? { kind: 'none' }
    : route === 'replay'
      ? { kind: 'cycle', keys: replayKeys }
      : { kind: 'fresh', prefix: `quick-${route}-${tag}-${Date.now()}` };
const load = (route: Route, tag: string, durationS: number) =>
  runLoad({
    port: app.port,
    path: route === 'pass_through' ? ROUTES.passThrough : ROUTE_PATHS[route],
    keys: keysOf(route, tag),
    connections,
    durationS,
  });

/** One round of a route; `statements`: what TypeORM sent per request, batches as one each. */
interface Sample {
  rps: number;
  p50: number;
  app: number;
  postgres: number;
  statements: number;
  rowsPerBatch: number;
}
const samples = new Map<Route, Sample[]>();
try {
  if (replayKeys.length > 0) await seedKeys(app.port, ROUTE_PATHS.replay, replayKeys);
  for (const route of routes) await load(route, 'warm-up', 1);
  for (let round = 0; round < rounds; round++) {
    for (const route of routes) {
      await app.command('queries-reset');
      const before = cpuSnapshot(app.pid);
      const result = await load(route, String(round), seconds);
      const counts = await app.command<QueryCounts>('queries-read');
      if (result.non2xx + result.errors > 0)
        throw new Error(`${route}: ${result.non2xx} non-2xx, ${result.errors} errors`);
      const cpu = cpuPerRequest(before, cpuSnapshot(app.pid), result.requests);
      const list = samples.get(route) ?? [];
      list.push({
        rps: result.rps,
        p50: result.p50_ms,
        app: cpu.app_ms,
        postgres: cpu.postgres_ms,
        statements: counts.typeorm / result.requests,
        rowsPerBatch: counts.batches > 0 ? counts.batchRows / counts.batches : NaN,
      });
      samples.set(route, list);
    }
  }
} finally {
  await app.stop();
  if (database === 'postgres') await dropSchema(BENCH_CONFIG.schema);
}

const medianOf = (route: Route, pick: (s: Sample) => number) =>
  median((samples.get(route) ?? []).map(pick));
console.log(`${database}, ${connections} connection(s), ${rounds} rounds of ${seconds} s; medians`);
for (const route of routes) {
  const base: Route = route.startsWith('write') ? 'write' : 'plain';
  const rps = medianOf(route, (s) => s.rps);
  const baseRps = samples.has(base) ? medianOf(base, (s) => s.rps) : NaN;
  console.log(
    `${route.padEnd(12)} ${String(Math.round(rps)).padStart(6)} req/s  p50 ${medianOf(route, (s) => s.p50)} ms  × ${base} ${(rps / baseRps).toFixed(2)}  CPU ms/req app ${medianOf(route, (s) => s.app).toFixed(3)}, postgres ${medianOf(route, (s) => s.postgres).toFixed(3)}; statements/req ${medianOf(route, (s) => s.statements).toFixed(2)} (${medianOf(route, (s) => s.rowsPerBatch).toFixed(1)} rows per batch)`,
  );
}
process.exit(0);
