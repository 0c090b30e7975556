import type { WaiterDelayFigures, WaiterDelayResult } from './waiter-delay.js';
import { BENCH_CONFIG } from './bench-config.js';
import type { GrowthResult } from './growth.js';
import type { PurgeResult } from './purge-and-memory.js';
import type { ProfileSummary } from './profile.js';
import type { StoreBatchingResult } from './store-batching.js';
import {
  checkTargets,
  cpuTotal,
  freeLibraryBound,
  profileSummaryLines,
  type BenchResults,
  type Database,
  type DatabaseResults,
  type RunMeasurements,
} from './report-model.js';

const DATABASE_LABEL: Record<Database, string> = {
  postgres: 'PostgreSQL (server on this machine)',
  pglite: 'PGlite (embedded, in the app process)',
};

const ROUTE_LABEL: Record<string, string> = {
  plain: 'plain (no @Idempotent, ceiling)',
  pass_through: 'plain behind an interceptor that does nothing (NestJS 12)',
  first: 'first (@Idempotent, fresh key)',
  replay: 'replay (@Idempotent, completed key)',
  write: 'realistic handler (one INSERT), no @Idempotent: × for the two rows below',
  write_first: 'realistic handler, @Idempotent, fresh key',
  write_tx: 'realistic handler, @Idempotent transactional, fresh key',
  peer_redis: 'peer Redis, fresh key',
  peer_redis_replay: 'peer Redis, completed key',
  peer_redis_plain: 'peer app plain (NestJS 10 ceiling)',
  peer_redis_pass_through: 'peer app plain behind an interceptor that does nothing (NestJS 10)',
  peer_memory: 'peer memory, fresh key',
  peer_memory_replay: 'peer memory, completed key',
  peer_memory_plain: 'peer app plain (NestJS 10, memory process)',
  redis_plain: 'ours on Redis: app plain (the Redis process’s ceiling)',
  redis_first: 'ours on Redis (RedisIdempotencyStore), fresh key',
  redis_replay: 'ours on Redis (RedisIdempotencyStore), completed key',
};

/** The headline table of one database: printed to the console and put in results.md. */
export function routeTable(database: Database, results: DatabaseResults): string {
  const lines = [
    `### ${DATABASE_LABEL[database]}`,
    '',
    '| route | req/s | p50 ms | p99 ms | × plain | rounds req/s | CPU ms/req: app | postgres | redis | autocannon | other |',
    '| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |',
  ];
  for (const [name, route] of Object.entries(results.routes)) {
    const cpu = route.cpu_ms_per_req;
    const bad =
      route.non2xx + route.errors > 0 ? ` ⚠ ${route.non2xx} non-2xx, ${route.errors} errors` : '';
    lines.push(
      `| ${ROUTE_LABEL[name] ?? name}${bad} | ${route.rps} | ${route.p50_ms} | ${route.p99_ms} | ${route.ratio_to_plain ?? '–'} | ${route.rounds_rps.join(' / ')} | ${cpu.app_ms} | ${cpu.postgres_ms} | ${cpu.redis_ms} | ${cpu.runner_ms} | ${cpu.other_ms} |`,
    );
  }
  return lines.join('\n');
}

export function queriesTable(queries: RunMeasurements['queries']): string {
  const lines = [
    '| app | first: statements/req | replay: statements/req | first: wire round trips | replay: wire round trips | statements (first; replay) |',
    '| --- | ---: | ---: | ---: | ---: | --- |',
  ];
  for (const [target, q] of Object.entries(queries)) {
    const statements = (counts: Record<string, number>) =>
      Object.entries(counts)
        .map(([label, n]) => `${label} ×${n}`)
        .join(', ');
    lines.push(
      `| ${target} | ${q.first} | ${q.replay} | ${q.first_wire ?? '–'} | ${q.replay_wire ?? '–'} | ${statements(q.statements.first)}; ${statements(q.statements.replay)} |`,
    );
  }
  return lines.join('\n');
}

/** The realistic handler's statements and commits per request, with and without the transaction. */
export function writeQueriesTable(queries: RunMeasurements['queries']): string {
  const lines = [
    '| app | realistic handler | statements/req | commits/req |',
    '| --- | --- | --- | ---: |',
  ];
  for (const [target, q] of Object.entries(queries)) {
    if (!q.write) continue;
    const statements = (counts: Record<string, number>) =>
      Object.entries(counts)
        .map(([label, n]) => `${label} ×${n}`)
        .join(', ');
    lines.push(
      `| ${target} | @Idempotent() | ${statements(q.write.idempotent.statements)} | ${q.write.idempotent.commits} |`,
    );
    lines.push(
      `| ${target} | @Idempotent({ transactional: true }) | ${statements(q.write.transactional.statements)} | ${q.write.transactional.commits} |`,
    );
  }
  return lines.join('\n');
}

function growthTable(growth: GrowthResult): string {
  const lines = [
    '| rows | bulk insert s | claim new p50 / p99 ms | claim existing (lookup) p50 / p99 ms | PK SELECT p50 / p99 ms |',
    '| ---: | ---: | ---: | ---: | ---: |',
  ];
  for (const point of growth.points) {
    lines.push(
      `| ${point.rows.toLocaleString('en')} | ${point.insert_s.toFixed(1)} | ${point.claim_new.p50_ms} / ${point.claim_new.p99_ms} | ${point.claim_existing.p50_ms} / ${point.claim_existing.p99_ms} | ${point.select_by_pk.p50_ms} / ${point.select_by_pk.p99_ms} |`,
    );
  }
  lines.push(
    '',
    `Lookup p50 largest/smallest: **${growth.lookup_p50_ratio.toFixed(2)}**; claim-new p50: ${growth.claim_p50_ratio.toFixed(2)}.`,
  );
  return lines.join('\n');
}

function purgeSection(purge: PurgeResult, idle: GrowthResult['purge_idle'] | undefined): string {
  const during = purge.first_during_purge;
  const without = purge.first_without_purge;
  const after = purge.first_after_purge;
  const pool = (p: typeof during.pool) =>
    p ? `${p.mean_waiting} (max ${p.max_waiting}) of ${p.pool_size}` : '–';
  return [
    `${purge.deleted.toLocaleString('en')} of ${purge.expired_rows.toLocaleString('en')} expired rows deleted by \`IdempotencyPurgeJob.purgeNow()\` (batch ${purge.batch_size}, the default) in ${purge.seconds} s while \`first\` was loaded: **${purge.rows_per_s.toLocaleString('en')} rows/s**; ${purge.left_over} expired rows left. (Bulk insert of the expired rows: ${purge.insert_s} s.)`,
    '',
    '',
    idle
      ? `The same store purge with no traffic (growth phase, ${idle.rows.toLocaleString('en')} expired rows next to 1M+ live ones, one connection of its own): **${idle.rows_per_s.toLocaleString('en')} rows/s**.`
      : 'No idle purge measured.',
    '',
    '| `first` route | req/s | p50 ms | p99 ms | requests waiting for a pool connection: mean (max) of pool size |',
    '| --- | ---: | ---: | ---: | --- |',
    `| without purge (${without.durationS.toFixed(0)} s) | ${without.rps.toFixed(0)} | ${without.p50_ms} | ${without.p99_ms} | ${pool(without.pool)} |`,
    `| during purge (${during.durationS.toFixed(0)} s) | ${during.rps.toFixed(0)} | ${during.p50_ms} | ${during.p99_ms} | ${pool(during.pool)} |`,
    `| after purge (${after.durationS.toFixed(0)} s) | ${after.rps.toFixed(0)} | ${after.p50_ms} | ${after.p99_ms} | ${pool(after.pool)} |`,
  ].join('\n');
}

/**
 * CPU per request turned into the throughput this machine could give the route if nothing else
 * ran: the routes are CPU-bound (app, database and load generator share the cores), so this is
 * what the ratios to `plain` can at most be, whatever the latency.
 */
function limitsSection(results: BenchResults, cores: number): string[] {
  const lines = [
    '## What limits the routes',
    '',
    `CPU per request of everything the route needs (app + postgres + redis + autocannon, from the tables above) and the throughput ${cores} cores would give at that cost:`,
    '',
    '| database | route | CPU ms/req | ceiling req/s on these cores | measured req/s |',
    '| --- | --- | ---: | ---: | ---: |',
  ];
  for (const database of ['postgres', 'pglite'] as const) {
    const routes = results[database]?.routes ?? {};
    const names =
      database === 'postgres'
        ? ['plain', 'first', 'replay', 'peer_redis', 'peer_redis_replay']
        : ['plain', 'first', 'replay'];
    for (const name of names) {
      const route = routes[name];
      if (!route) continue;
      const total = cpuTotal(route);
      lines.push(
        `| ${database} | ${name} | ${total.toFixed(2)} | ${total > 0 ? Math.round((cores * 1000) / total) : '–'} | ${route.rps} |`,
      );
    }
  }
  lines.push(...freeLibraryBounds(results));
  const explain = results.postgres?.growth?.explain?.claim_existing;
  const wal = explain ? /WAL: records=(\d+)/.exec(explain) : null;
  if (wal) {
    lines.push(
      '',
      `The replay path is a write: the claim's EXPLAIN on a completed key shows \`WAL: records=${wal[1]}\`. \`INSERT … ON CONFLICT DO UPDATE … WHERE\` locks the conflicting row even when the WHERE is false, so each replay takes a transaction id, writes WAL (a full-page image when it is the first change to that page since a checkpoint) and waits for the WAL flush at commit, where a read would do none of that (compare the PK SELECT column of the growth table).`,
    );
  }
  return lines;
}

function codeBlock(text: string): string {
  return ['```', text, '```'].join('\n');
}

export function renderMarkdown(run: RunMeasurements, results: BenchResults): string {
  const m = run.machine;
  const out: string[] = [
    '# Benchmark results (`npm run bench`)',
    '',
    `${m.date} — ${m.cores} × ${m.cpu}, ${m.memory_gib} GiB, ${m.os}. Node ${m.node}, NestJS ${m.nest}, TypeORM ${m.typeorm}, pg ${m.pg_driver}, PostgreSQL ${m.postgresql}, PGlite ${m.pglite}, Redis ${m.redis}, autocannon ${m.autocannon}. Peer: ${m.peer_library} on NestJS ${m.peer_nest}.`,
    '',
    `Load: autocannon, ${BENCH_CONFIG.connections} connections, pipelining 1, ${BENCH_CONFIG.durationS} s per route per round, ${BENCH_CONFIG.rounds} alternating rounds (each round loads every app's routes once, starting from a different app); figures are medians over the rounds. Each app runs in its own process; autocannon runs in the runner process, on the same 2 cores as the apps and the databases. The replay route cycles through ${BENCH_CONFIG.replayKeys} keys completed before the rounds. The whole run took ${(run.elapsedS / 60).toFixed(1)} min${BENCH_CONFIG.soak ? ' (soak mode)' : ''}.`,
    '',
    "CPU columns: CPU time per request, from /proc: the app process (for PGlite this includes the embedded database), every `postgres` process (other sessions' backends too), `redis-server`, the runner (autocannon), and `other`: the machine's busy time that none of these account for (kernel, and processes of other sandboxes sharing these cores, invisible in /proc). A large `other` means the figures were taken on a busy machine.",
    '',
    `Machine busy before the bench started (2 s sample, all cores): ${run.backgroundBusy === null ? 'unknown' : `${Math.round(run.backgroundBusy * 100)} %`}.`,
    '',
    '## Routes',
    '',
  ];
  for (const database of ['postgres', 'pglite'] as const) {
    const entry = results[database];
    if (entry) out.push(routeTable(database, entry), '');
  }
  out.push(...limitsSection(results, m.cores), '');
  out.push(...targetsSection(run, results));
  out.push(
    '',
    "## Profile: where the app's CPU per request goes",
    '',
    "Each of our apps loaded for a few seconds per route with V8's sampling profiler on (in the running app, through node:inspector), self time summed by the code it was spent in and divided by the requests served. The profiler slows every route alike; compare routes, not these figures with the rounds above. `npm run bench:profile` runs this part alone; `BENCH_PROFILE_DIR=dir` keeps the profiles for Chrome DevTools.",
    '',
    profileTable(run.profiles),
    ...storeBatchingSection(run.storeBatching),
    '## Database statements per request',
    '',
    'Counted in the app while nothing else runs (200 sequential requests each): statements TypeORM sent (its logger) and, on PostgreSQL, queries on the `pg` client (every round trip). For the peer, calls to its storage adapter (each one Redis command).',
    '',
    queriesTable(run.queries),
    '',
    'The realistic handler (one INSERT of a payment row): in the transactional mode the INSERT and the completion share one transaction, so the completion adds no commit of its own.',
    '',
    writeQueriesTable(run.queries),
    '',
  );
  for (const database of ['postgres', 'pglite'] as const) {
    const growth = run.growth[database];
    if (!growth) continue;
    out.push(
      `## Growth: ${DATABASE_LABEL[database]}`,
      '',
      `Sequential, one client, through \`TypeOrmIdempotencyStore\` (1000 operations per cell after 100 of warm-up, random keys), on tables filled with synthetic completed rows by INSERT … SELECT generate_series. ${database === 'postgres' ? 'PostgreSQL: a table per size, each in a schema of its own, all filled first and then timed in 5 alternating blocks of 200 operations, so drift of the machine hits every size alike.' : 'PGlite (one database per process): one table grown in place, timed after each step.'}`,
      '',
      growthTable(growth),
      '',
    );
    if (growth.explain) {
      out.push(
        'EXPLAIN (ANALYZE, BUFFERS, WAL) of the claim statement on a completed key (the replay path), at the largest size, rolled back:',
        '',
        codeBlock(growth.explain.claim_existing),
        '',
        'The same on a new key (the first-request path):',
        '',
        codeBlock(growth.explain.claim_new),
        '',
        "The first request's second statement, `complete` (a prepared UPDATE conditional on the lease), on a row claimed in the same transaction:",
        '',
        codeBlock(growth.explain.complete),
        '',
      );
    }
  }
  if (run.purge) {
    out.push(
      '## Purge (PostgreSQL only)',
      '',
      purgeSection(run.purge, run.growth.postgres?.purge_idle),
      '',
      'EXPLAIN (ANALYZE, BUFFERS, WAL) of one purge batch with the expired rows in place, rolled back:',
      '',
      codeBlock(run.purge.explain),
      '',
    );
  } else {
    out.push(
      '## Purge',
      '',
      'Not measured (PostgreSQL absent). PGlite: not measured; the purge phase is PostgreSQL only.',
      '',
    );
  }
  if (run.waiterDelay) out.push(...waiterDelaySection(run.waiterDelay), '');
  out.push(
    '## Memory',
    '',
    'RSS of the app process after a forced GC: before its first request, warm (after the first `first` load: pool connections open, code compiled) and after all the `first` requests of the memory/purge phase (the loads without and during the purge count towards them). Growth after warm is what the steady state added. For PGlite the RSS includes the in-memory database.',
    '',
    '| app | `first` requests | RSS before MB | RSS warm MB (after n requests) | RSS after MB | growth after warm MB | heap used before → warm → after MB | forced GC |',
    '| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |',
  );
  for (const [database, memory] of Object.entries(run.memory)) {
    out.push(
      `| ${database} | ${memory.requests.toLocaleString('en')}${memory.capped ? ` (of ${memory.target_requests.toLocaleString('en')} asked: stopped by the ${BENCH_CONFIG.budgetS} s run budget)` : ''} | ${memory.rss_before_mb} | ${memory.rss_warm_mb} (${memory.requests_warm.toLocaleString('en')}) | ${memory.rss_after_mb} | ${memory.rss_growth_after_warm_mb} | ${memory.heap_before_mb} → ${memory.heap_warm_mb} → ${memory.heap_after_mb} | ${memory.gc_forced ? 'yes' : 'no'} |`,
    );
  }
  out.push(...inFlightSection(run.inFlight));
  if (run.skipped.length > 0)
    out.push('', '## Skipped', '', ...run.skipped.map((line) => `- ${line}`));
  return out.join('\n') + '\n';
}

/**
 * The targets of issue 21 with this run's figures, met or missed, then the profile summary: what
 * `npm run bench` prints at its end, too.
 */
export function targetsSection(run: RunMeasurements, results: BenchResults): string[] {
  const checks = checkTargets(results, {
    inFlight: run.inFlight,
    profiles: run.profiles,
    storeBatching: run.storeBatching,
  });
  return [
    '## Targets (issue 21)',
    '',
    'All figures from this run (CPU per request from /proc, medians over the rounds; `–`: a figure to read, no bound).',
    '',
    '| target | measured | met |',
    '| --- | --- | --- |',
    ...checks.map(
      (check) =>
        `| ${check.target} | ${check.measured} | ${check.met === null ? '–' : check.met ? 'met' : '**missed**'} |`,
    ),
    '',
    'Profile summary (V8 profiles under load, see the Profile section):',
    '',
    ...profileSummaryLines(run.profiles),
    '',
  ];
}

/** Heap per request in flight and per running lease (bench/in-flight-memory.ts). */
function inFlightSection(inFlight: RunMeasurements['inFlight']): string[] {
  const rows = Object.entries(inFlight).filter(([, memory]) => memory);
  if (rows.length === 0) return [];
  return [
    '',
    'Per request in flight: heap used (+ external) of the app after a forced GC with requests of the `hold` routes parked in their handler, over the same with none in flight. With `@Idempotent()` each holds a running lease (claimed, its renewal scheduled).',
    '',
    '| app | held at once | KiB per request, no @Idempotent | KiB per request, @Idempotent | KiB per running lease |',
    '| --- | ---: | ---: | ---: | ---: |',
    ...rows.map(
      ([name, memory]) =>
        `| ${name} | ${memory!.requests} | ${memory!.plain_kib_per_request} | ${memory!.idempotent_kib_per_request} | ${memory!.kib_per_lease} |`,
    ),
  ];
}

/** Wait mode on PostgreSQL: LISTEN/NOTIFY against polling, from bench/waiter-delay.ts. */
function waiterDelaySection(result: WaiterDelayResult): string[] {
  const row = (label: string, f: WaiterDelayFigures) =>
    `| ${label} | ${f.p50Ms} | ${f.p99Ms} | ${f.maxMs} | ${f.readsPerWaiter} |`;
  return [
    '## Wait mode: how long a waiter waits beyond the first request (PostgreSQL)',
    '',
    `${result.keys} keys per mode; per key the first request "runs" 0–${result.maxRunMs} ms while a duplicate waits (\`concurrency: 'wait'\`), one app context each, as two processes behind a load balancer. Delay = from the completion's write returning to the waiter's replay returning. Polling at the default \`waitPollInterval\` (${result.waitPollIntervalMs} ms).`,
    '',
    '| waiter woken by | p50 ms | p99 ms | max ms | reads of the record per waiter |',
    '| --- | ---: | ---: | ---: | ---: |',
    row('LISTEN/NOTIFY (default on PostgreSQL)', result.notifications),
    row(`polling every ${result.waitPollIntervalMs} ms`, result.polling),
  ];
}

/**
 * Where the app's CPU per request goes (V8 CPU profiles; the profiler's own cost inflates every
 * figure alike): per target, ms per request by category on plain, first and replay, and the extra
 * of first and replay over plain; then the library's costliest functions on `first`.
 */
export function profileTable(summaries: readonly ProfileSummary[]): string {
  const out: string[] = [];
  for (const summary of summaries) {
    const categories = [
      ...new Set([
        ...Object.keys(summary.plain),
        ...Object.keys(summary.first),
        ...Object.keys(summary.replay),
      ]),
    ]
      .filter((category) => category !== 'idle')
      .sort(
        (a, b) =>
          (summary.first[b] ?? 0) -
          (summary.plain[b] ?? 0) -
          ((summary.first[a] ?? 0) - (summary.plain[a] ?? 0)),
      );
    const total = (times: Record<string, number>) =>
      categories.reduce((sum, category) => sum + (times[category] ?? 0), 0);
    const ms = (value: number) => value.toFixed(3);
    out.push(
      `#### ${summary.target}: CPU ms per request, by code`,
      '',
      '| code | plain | first | first − plain | replay | replay − plain |',
      '| --- | ---: | ---: | ---: | ---: | ---: |',
    );
    for (const category of categories) {
      const plain = summary.plain[category] ?? 0;
      const first = summary.first[category] ?? 0;
      const replay = summary.replay[category] ?? 0;
      out.push(
        `| ${category} | ${ms(plain)} | ${ms(first)} | ${ms(first - plain)} | ${ms(replay)} | ${ms(replay - plain)} |`,
      );
    }
    const [plain, first, replay] = [
      total(summary.plain),
      total(summary.first),
      total(summary.replay),
    ];
    out.push(
      `| **all (idle aside)** | ${ms(plain)} | ${ms(first)} | ${ms(first - plain)} | ${ms(replay)} | ${ms(replay - plain)} |`,
      '',
    );
    const load = summary.underLoad;
    const batch = (rows: number | null) =>
      rows === null ? 'none batched' : `${rows} rows per batched statement`;
    out.push(
      `Under this load: \`plain\` ${load.plain.rps} req/s; \`first\` ${load.first.rps} req/s, ${load.first.statements_per_req} statements per request (${batch(load.first.rows_per_batch)}); \`replay\` ${load.replay.rps} req/s, ${load.replay.statements_per_req} (${batch(load.replay.rows_per_batch)}).`,
      '',
    );
    out.push(
      `The library's costliest functions on \`first\` (self time, µs per request): ${summary.libraryTop.map(({ fn, us_per_req }) => `${fn} ${us_per_req}`).join('; ')}.`,
      '',
    );
  }
  return out.join('\n');
}

/** The store alone on PostgreSQL: batched statements against one statement per request. */
export function storeBatchingSection(result: StoreBatchingResult | null): string[] {
  if (!result) return [];
  const row = (label: string, side: StoreBatchingResult['batched']) =>
    `| ${label} | ${side.rps} | ${side.app_cpu_ms} | ${side.postgres_cpu_ms} |`;
  return [
    '## Batched statements, the store alone (PostgreSQL)',
    '',
    `\`TypeOrmIdempotencyStore\` in the runner's process, no HTTP: ${result.workers} concurrent callers, ${result.operations} fresh keys each claimed and completed, with \`batchStatements\` on and off in alternating rounds (medians of 3 after a warm-up round).`,
    '',
    '| store | claim + complete per s | CPU ms/op: this process | postgres |',
    '| --- | ---: | ---: | ---: |',
    row('batched (default)', result.batched),
    row('one statement per request', result.single),
    '',
    `Batched: ×${(result.batched.rps / result.single.rps).toFixed(2)} the throughput.`,
    '',
  ];
}

/** The ratio each PostgreSQL route would reach if the library's own code cost nothing. */
function freeLibraryBounds(results: BenchResults): string[] {
  const routes = results.postgres?.routes;
  if (!routes) return [];
  const rows: string[] = [];
  for (const [name, baseName, target] of [
    ['first', 'plain', '0.9× bound'],
    ['write_first', 'write', '–'],
    ['write_tx', 'write', '–'],
  ] as const) {
    const route = routes[name];
    const computed = freeLibraryBound(route, routes[baseName]);
    if (!route || !computed) continue;
    const { databaseExtraMs, bound } = computed;
    rows.push(
      `| ${ROUTE_LABEL[name]} | ${target} | ${databaseExtraMs.toFixed(3)} | ${bound.toFixed(2)} | ${route.ratio_to_plain ?? '–'} | ${route.ratio_to_plain != null ? (route.ratio_to_plain / bound).toFixed(2) : '–'} |`,
    );
  }
  if (rows.length === 0) return [];
  return [
    '',
    "If the library's own code cost nothing (the app as fast as without it), the database's work for the route would still share these cores: the best ratio a library could reach here is the base route's CPU per request over that plus the database's extra CPU per request.",
    '',
    '| route | target | database CPU above its base, ms/req | best ratio with a free library | measured | measured ÷ bound |',
    '| --- | ---: | ---: | ---: | ---: | ---: |',
    ...rows,
  ];
}
