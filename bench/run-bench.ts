/**
 * `npm run bench`: loads the routes of our app (PostgreSQL and PGlite) and of the peer library
 * (@node-idempotency/nestjs on Redis and in memory) in alternating rounds, counts statements per
 * request, then measures memory, purge throughput and growth, and writes bench/results.md and
 * bench/results.json. Settings: bench-config.ts (BENCH_DURATION, BENCH_ROUNDS, BENCH_SOAK=1, …).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BENCH_CONFIG, PROJECT_ROOT } from './bench-config.js';
import { describeMachine, detectServices, dropSchema, resetSchema } from './environment.js';
import { measureGrowth, type GrowthResult } from './growth.js';
import { machineBusyFraction } from './cpu-usage.js';
import { measureMemoryAndPurge, type MemoryResult, type PurgeResult } from './purge-and-memory.js';
import {
  buildResults,
  checkTargets,
  profileSummaryLines,
  type Database,
  type RunMeasurements,
} from './report-model.js';
import {
  profileTable,
  queriesTable,
  renderMarkdown,
  routeTable,
  writeQueriesTable,
} from './report-markdown.js';
import { measureInFlightMemory, type InFlightMemory } from './in-flight-memory.js';
import { measureWaiterDelay, type WaiterDelayResult } from './waiter-delay.js';
import { profileTarget, type ProfileSummary } from './profile.js';
import { measureStoreBatching, type StoreBatchingResult } from './store-batching.js';
import {
  countQueries,
  runRounds,
  startTargets,
  type QueriesPerRequest,
  type Samples,
  type Target,
  type TargetName,
} from './route-rounds.js';

const started = performance.now();
const elapsed = () => `${((performance.now() - started) / 1000).toFixed(0).padStart(4)} s`;
const log = (line: string) => console.log(`[bench ${elapsed()}] ${line}`);

// Other sandboxes may share these cores: measured first, so results.md says how busy it was.
const backgroundBusy = await machineBusyFraction(2000);
const services = await detectServices();
for (const line of services.skipped) console.warn(`[bench] SKIPPED: ${line}`);
if (services.postgres) await resetSchema(BENCH_CONFIG.schema);

let targets: Target[] = [];
let samples!: Samples;
const queries: Partial<Record<TargetName, QueriesPerRequest>> = {};
const memory: Partial<Record<Database, MemoryResult>> = {};
const growth: Partial<Record<Database, GrowthResult>> = {};
let purge: PurgeResult | null = null;
let waiterDelay: WaiterDelayResult | null = null;
const profiles: ProfileSummary[] = [];
const inFlight: Partial<Record<string, InFlightMemory>> = {};
let storeBatching: StoreBatchingResult | null = null;

// Children exit when the runner's IPC channel closes, so Ctrl-C leaves no orphan apps behind.
process.once('SIGINT', () => process.exit(130));

try {
  log(
    `starting ${services.postgres ? 'PostgreSQL, ' : ''}PGlite${services.peer ? ` and peer (${services.redis ? 'Redis, ' : ''}memory)` : ''} apps`,
  );
  targets = await startTargets(services, log);
  log(
    `apps up, ${BENCH_CONFIG.replayKeys} replay keys seeded in each; warm-up, then ${BENCH_CONFIG.rounds} rounds of ${BENCH_CONFIG.durationS} s per route`,
  );
  samples = await runRounds(targets, log);

  for (const target of targets) queries[target.name] = await countQueries(target);
  console.log(
    `\nStatements per request (target: replay = 1, first = 2):\n\n${queriesTable(queries)}\n`,
  );
  console.log(
    `Realistic handler, statements and commits per request:\n\n${writeQueriesTable(queries)}\n`,
  );

  for (const target of targets.filter((candidate) =>
    ['postgres', 'redis', 'pglite'].includes(candidate.name),
  )) {
    log(`profile: ${target.name}`);
    profiles.push(await profileTarget(target, 3));
  }
  console.log(`Where the app's CPU per request goes (profiled):\n\n${profileTable(profiles)}`);

  for (const target of targets.filter((candidate) =>
    ['postgres', 'redis', 'pglite'].includes(candidate.name),
  )) {
    log(`memory per in-flight request and per running lease: ${target.name}`);
    inFlight[target.name] = await measureInFlightMemory(target.app);
    const m = inFlight[target.name]!;
    log(
      `in flight (${m.requests} held): ${m.plain_kib_per_request} KiB per request without @Idempotent, ${m.idempotent_kib_per_request} KiB with, ${m.kib_per_lease} KiB per running lease`,
    );
  }

  // Memory and purge load the PostgreSQL app (PGlite's `first` is too slow for 100k requests in the
  // time budget: without PostgreSQL, PGlite gets a shorter memory reading and no purge).
  const memoryApp =
    targets.find((target) => target.name === 'postgres') ??
    targets.find((target) => target.name === 'pglite');
  if (memoryApp) {
    const postgres = memoryApp.name === 'postgres';
    const memoryRequests = postgres
      ? BENCH_CONFIG.memoryRequests
      : Math.min(BENCH_CONFIG.memoryRequests, 20_000);
    log(
      `memory${postgres ? ' and purge' : ''}: ${memoryRequests.toLocaleString('en')} first requests on ${memoryApp.name}`,
    );
    const measured = await measureMemoryAndPurge(
      memoryApp,
      {
        memoryRequests,
        purgeRows: postgres ? BENCH_CONFIG.purgeRows : null,
        topUpDeadline: started + (BENCH_CONFIG.budgetS - BENCH_CONFIG.growthReserveS) * 1000,
      },
      log,
    );
    memory[memoryApp.name as Database] = measured.memory;
    purge = measured.purge;
    const m = measured.memory;
    log(
      `memory: ${memoryApp.name} RSS ${m.rss_before_mb} → warm ${m.rss_warm_mb} → ${m.rss_after_mb} MB after ${m.requests.toLocaleString('en')} first requests${m.capped ? ` (CAPPED by the time budget; ${m.target_requests.toLocaleString('en')} asked)` : ''}`,
    );
    if (purge) {
      log(
        `purge: ${purge.deleted} rows in ${purge.seconds} s = ${purge.rows_per_s} rows/s; first p99 before/during/after ${purge.first_without_purge.p99_ms}/${purge.first_during_purge.p99_ms}/${purge.first_after_purge.p99_ms} ms`,
      );
    }
  }
  // Soak mode has no time budget: PGlite gets the full memory reading too.
  const pglite = targets.find((target) => target.name === 'pglite');
  if (BENCH_CONFIG.soak && pglite && pglite !== memoryApp) {
    log(
      `memory: ${BENCH_CONFIG.memoryRequests.toLocaleString('en')} first requests on pglite (soak)`,
    );
    const measured = await measureMemoryAndPurge(
      pglite,
      {
        memoryRequests: BENCH_CONFIG.memoryRequests,
        purgeRows: null,
        topUpDeadline: Number.POSITIVE_INFINITY,
      },
      log,
    );
    memory.pglite = measured.memory;
  }
} finally {
  for (const target of targets)
    await target.app.stop().catch((error: Error) => console.error(error.message));
}

if (services.postgres) {
  log('the store alone: batched statements against one statement per request');
  storeBatching = await measureStoreBatching();
  const { batched, single } = storeBatching;
  log(
    `store alone: batched ${batched.rps} ops/s (CPU ${batched.app_cpu_ms} + pg ${batched.postgres_cpu_ms} ms/op), one statement per request ${single.rps} ops/s (CPU ${single.app_cpu_ms} + pg ${single.postgres_cpu_ms} ms/op)`,
  );
}
// Growth runs with the apps stopped: sequential latencies, nothing else competing for the cores.
if (services.postgres) {
  log(
    `growth: PostgreSQL ${BENCH_CONFIG.growthSizes.postgres.map((n) => n.toLocaleString('en')).join(' → ')} rows`,
  );
  growth.postgres = await measureGrowth('postgres', BENCH_CONFIG.growthSizes.postgres);
}
if (services.postgres) {
  log(
    "wait mode: how long a waiter waits beyond the first request's completion (LISTEN/NOTIFY vs polling)",
  );
  waiterDelay = await measureWaiterDelay(BENCH_CONFIG.databaseUrl);
  const { notifications: n, polling: p } = waiterDelay;
  log(
    `waiter delay p50/p99: notifications ${n.p50Ms}/${n.p99Ms} ms, polling every ${waiterDelay.waitPollIntervalMs} ms ${p.p50Ms}/${p.p99Ms} ms`,
  );
}
log(
  `growth: PGlite ${BENCH_CONFIG.growthSizes.pglite.map((n) => n.toLocaleString('en')).join(' → ')} rows`,
);
growth.pglite = await measureGrowth('pglite', BENCH_CONFIG.growthSizes.pglite);
if (services.postgres) await dropSchema(BENCH_CONFIG.schema);

const run: RunMeasurements = {
  machine: describeMachine(services),
  profiles,
  storeBatching,
  samples,
  queries,
  growth,
  purge,
  memory,
  waiterDelay,
  inFlight,
  skipped: services.skipped,
  elapsedS: (performance.now() - started) / 1000,
  backgroundBusy,
};
const results = buildResults(run);
const targetChecks = checkTargets(results, { inFlight, profiles, storeBatching });
// BENCH_RESULTS_DIR: write the report elsewhere (a short trial run must not replace the committed one).
const benchDir = process.env.BENCH_RESULTS_DIR ?? join(PROJECT_ROOT, 'bench');
writeFileSync(
  join(benchDir, 'results.json'),
  JSON.stringify({ ...results, targets: targetChecks, in_flight_memory: inFlight }, null, 2) + '\n',
);
writeFileSync(join(benchDir, 'results.md'), renderMarkdown(run, results));

console.log('');
for (const database of ['postgres', 'pglite'] as const) {
  const entry = results[database];
  if (entry) console.log(routeTable(database, entry) + '\n');
}
for (const check of targetChecks) {
  console.log(
    `${check.met === null ? '  -   ' : check.met ? ' met  ' : ' MISSED'}  ${check.target}: ${check.measured}`,
  );
}
console.log(`\nProfile summary:\n${profileSummaryLines(profiles).join('\n')}`);
if (backgroundBusy !== null && backgroundBusy > 0.25) {
  console.warn(
    `[bench] note: the machine was ${Math.round(backgroundBusy * 100)} % busy before the bench started; see the "other" CPU column`,
  );
}
// The charts of a trial run go beside its report, not over docs/images.
await (
  await import('./charts.js')
).writeCharts(join(benchDir, 'results.json'), process.env.BENCH_RESULTS_DIR ? benchDir : undefined);
log(`done; wrote ${join(benchDir, 'results.md')}, results.json and the charts`);
// The PGlite worker thread of the growth phase can keep the event loop alive.
process.exit(0);
