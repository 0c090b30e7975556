import type { CpuPerRequest } from './cpu-usage.js';
import type { MachineInfo } from './environment.js';
import type { GrowthResult } from './growth.js';
import type { MemoryResult, PurgeResult } from './purge-and-memory.js';
import type { QueriesPerRequest, RouteName, Samples, TargetName } from './route-rounds.js';
import { median, round } from './stats.js';
import type { WaiterDelayResult } from './waiter-delay.js';
import type { ProfileSummary } from './profile.js';
import type { StoreBatchingResult } from './store-batching.js';
import type { InFlightMemory } from './in-flight-memory.js';

export type Database = 'postgres' | 'pglite';

/** One route's figures: medians over the rounds (one disturbed round does not move them). */
export interface RouteFigures {
  readonly rps: number;
  readonly p50_ms: number;
  readonly p99_ms: number;
  /** rps over this database's `plain` rps in the same run. */
  readonly ratio_to_plain: number | null;
  readonly rounds_rps: number[];
  readonly cpu_ms_per_req: CpuPerRequest;
  readonly non2xx: number;
  readonly errors: number;
}

export interface DatabaseResults {
  /**
   * plain, first, replay: ours on this database. peer_redis / peer_memory: @node-idempotency/nestjs
   * on the `first` load (fresh keys); *_replay on completed keys; *_plain: the peer app's own
   * ceiling (NestJS 10). The peer's figures are the same in both databases' entries.
   */
  readonly routes: Record<string, RouteFigures>;
  readonly queries: QueriesPerRequest | null;
  readonly growth: GrowthResult | null;
  readonly purge_rows_per_s: number | null;
  readonly purge: Omit<PurgeResult, 'explain'> | null;
  readonly memory: MemoryResult | null;
  /** Wait mode (PostgreSQL): how long a duplicate waits beyond the first's completion. */
  readonly waiter_delay: WaiterDelayResult | null;
  /** Where the app's CPU per request goes, on this database (and, under postgres, ours on Redis). */
  readonly profiles: readonly ProfileSummary[];
  readonly store_batching: StoreBatchingResult | null;
  readonly machine: MachineInfo;
}

export type BenchResults = Partial<Record<Database, DatabaseResults>>;

/** Everything a run measured, before it is shaped into results.json and results.md. */
export interface RunMeasurements {
  readonly machine: MachineInfo;
  /** Where each of our apps' CPU per request goes (V8 profiles under load). */
  readonly profiles: readonly ProfileSummary[];
  /** The PostgreSQL store alone, batched statements against one statement per request. */
  readonly storeBatching: StoreBatchingResult | null;
  readonly samples: Samples;
  readonly queries: Partial<Record<TargetName, QueriesPerRequest>>;
  readonly growth: Partial<Record<Database, GrowthResult>>;
  readonly purge: PurgeResult | null;
  readonly memory: Partial<Record<Database, MemoryResult>>;
  readonly waiterDelay: WaiterDelayResult | null;
  /** Heap per request in flight and per running lease, per app (postgres, pglite, redis). */
  readonly inFlight: Partial<Record<string, InFlightMemory>>;
  readonly skipped: string[];
  readonly elapsedS: number;
  /** Fraction of all cores busy before the bench started (other sessions' work), or null. */
  readonly backgroundBusy: number | null;
}

function figures(
  samples: Samples,
  target: TargetName,
  route: RouteName,
  plainRps: number | null,
): RouteFigures | null {
  const runs = samples.get(`${target}:${route}`);
  if (!runs || runs.length === 0) return null;
  const rps = round(median(runs.map((run) => run.rps)), 0);
  const cpu = (key: keyof CpuPerRequest) => round(median(runs.map((run) => run.cpu[key])), 3);
  return {
    rps,
    p50_ms: median(runs.map((run) => run.p50_ms)),
    p99_ms: median(runs.map((run) => run.p99_ms)),
    ratio_to_plain: plainRps ? round(rps / plainRps, 2) : null,
    rounds_rps: runs.map((run) => round(run.rps, 0)),
    cpu_ms_per_req: {
      app_ms: cpu('app_ms'),
      runner_ms: cpu('runner_ms'),
      postgres_ms: cpu('postgres_ms'),
      redis_ms: cpu('redis_ms'),
      other_ms: cpu('other_ms'),
    },
    non2xx: runs.reduce((sum, run) => sum + run.non2xx, 0),
    errors: runs.reduce((sum, run) => sum + run.errors, 0),
  };
}

/** Route names of results.json, and where each comes from. */
const PEER_ROUTES: readonly [string, TargetName, RouteName][] = [
  ['peer_redis', 'peer_redis', 'first'],
  ['peer_redis_replay', 'peer_redis', 'replay'],
  ['peer_redis_plain', 'peer_redis', 'plain'],
  ['peer_redis_pass_through', 'peer_redis', 'pass_through'],
  ['peer_memory', 'peer_memory', 'first'],
  ['peer_memory_replay', 'peer_memory', 'replay'],
  ['peer_memory_plain', 'peer_memory', 'plain'], // only when Redis is absent
  // Ours on the RedisIdempotencyStore: like for like with the peer on Redis.
  ['redis_plain', 'redis', 'plain'],
  ['redis_first', 'redis', 'first'],
  ['redis_replay', 'redis', 'replay'],
];

export function buildResults(run: RunMeasurements): BenchResults {
  const results: BenchResults = {};
  for (const database of ['postgres', 'pglite'] as const) {
    const plain = figures(run.samples, database, 'plain', null);
    if (!plain) continue;
    const routes: Record<string, RouteFigures> = { plain: { ...plain, ratio_to_plain: 1 } };
    for (const route of ['pass_through', 'first', 'replay'] as const) {
      const figure = figures(run.samples, database, route, plain.rps);
      if (figure) routes[route] = figure;
    }
    // The realistic handler, as ratios to the same handler without the library.
    const write = figures(run.samples, database, 'write', null);
    if (write) {
      routes.write = { ...write, ratio_to_plain: 1 };
      for (const route of ['write_first', 'write_tx'] as const) {
        const figure = figures(run.samples, database, route, write.rps);
        if (figure) routes[route] = figure;
      }
    }
    for (const [name, target, route] of PEER_ROUTES) {
      const figure = figures(run.samples, target, route, plain.rps);
      if (figure) routes[name] = figure;
    }
    const purge = database === 'postgres' ? run.purge : null;
    results[database] = {
      routes,
      queries: run.queries[database] ?? null,
      growth: run.growth[database] ?? null,
      purge_rows_per_s: purge?.rows_per_s ?? null,
      purge: purge ? withoutExplain(purge) : null,
      memory: run.memory[database] ?? null,
      waiter_delay: database === 'postgres' ? run.waiterDelay : null,
      store_batching: database === 'postgres' ? run.storeBatching : null,
      profiles: run.profiles.filter(
        (profile) =>
          profile.target === database || (database === 'postgres' && profile.target === 'redis'),
      ),
      machine: run.machine,
    };
  }
  return results;
}

function withoutExplain({ explain: _explain, ...rest }: PurgeResult): Omit<PurgeResult, 'explain'> {
  return rest;
}

/** A target of issue 21, checked against the run's figures (`met` null: a figure to read, or missing). */
export interface TargetCheck {
  readonly target: string;
  readonly measured: string;
  readonly met: boolean | null;
}

/** CPU per request of everything a route needs: the app, PostgreSQL, Redis and the load generator. */
export function cpuTotal(route: RouteFigures): number {
  const cpu = route.cpu_ms_per_req;
  return cpu.app_ms + cpu.postgres_ms + cpu.redis_ms + cpu.runner_ms;
}

/**
 * The ratio a PostgreSQL route would reach over its base if the library's own code cost nothing: the
 * app costs what it costs without the library, and the database does the work it did for the
 * route. On cores that the database shares with the app and the load generator, throughput at
 * equal utilisation goes as 1 / (CPU per request), so the bound is base ÷ (base + the database's
 * extra).
 */
export function freeLibraryBound(
  route: RouteFigures | undefined,
  base: RouteFigures | undefined,
): { readonly databaseExtraMs: number; readonly bound: number } | null {
  if (!route || !base) return null;
  const databaseExtraMs = Math.max(
    0,
    route.cpu_ms_per_req.postgres_ms - base.cpu_ms_per_req.postgres_ms,
  );
  return { databaseExtraMs, bound: cpuTotal(base) / (cpuTotal(base) + databaseExtraMs) };
}

/** What `checkTargets` needs besides the route figures. */
export interface TargetExtras {
  readonly inFlight?: Partial<Record<string, InFlightMemory>>;
  readonly profiles?: readonly ProfileSummary[];
  readonly storeBatching?: StoreBatchingResult | null;
}

/**
 * The targets of issue 21 with this run's figures: all of them from one run, so each compares
 * figures taken on the same machine state. A figure over routes that had failed requests is
 * flagged: it does not measure the happy path.
 */
export function checkTargets(results: BenchResults, extras: TargetExtras = {}): TargetCheck[] {
  const pg = results.postgres;
  const lite = results.pglite;
  const checks: TargetCheck[] = [];
  const routeOf = (database: DatabaseResults | undefined, name: string) => database?.routes[name];
  const warn = (database: DatabaseResults | undefined, names: string[]) =>
    names.some((name) => {
      const route = routeOf(database, name);
      return (route?.non2xx ?? 0) + (route?.errors ?? 0) > 0;
    })
      ? ' (⚠ failed requests in these routes)'
      : '';
  const push = (target: string, measured: string | null, met: boolean | null) =>
    checks.push({ target, measured: measured ?? 'not measured', met: measured ? met : null });
  const ms = (value: number) => `${value.toFixed(3)} ms`;
  const signed = (value: number) => `${value < 0 ? '−' : '+'}${ms(Math.abs(value))}`;
  const app = (route: RouteFigures | undefined) => route?.cpu_ms_per_req.app_ms;

  // 1. App CPU overhead of a fresh key over the same app's plain route, against the peer's.
  const peerFirst = routeOf(pg, 'peer_redis');
  const peerPlain = routeOf(pg, 'peer_redis_plain');
  const peerOverhead =
    app(peerFirst) !== undefined && app(peerPlain) !== undefined
      ? app(peerFirst)! - app(peerPlain)!
      : undefined;
  for (const [label, first, plain] of [
    ['PostgreSQL', 'first', 'plain'],
    ['the Redis store', 'redis_first', 'redis_plain'],
  ] as const) {
    const ours =
      app(routeOf(pg, first)) !== undefined && app(routeOf(pg, plain)) !== undefined
        ? app(routeOf(pg, first))! - app(routeOf(pg, plain))!
        : undefined;
    push(
      `fresh key, ${label}: app CPU over its plain route ≤ the peer's over its own plain (Redis)`,
      ours !== undefined && peerOverhead !== undefined
        ? `ours ${signed(ours)}, peer ${signed(peerOverhead)}${warn(pg, [first, plain, 'peer_redis', 'peer_redis_plain'])}`
        : null,
      ours !== undefined && peerOverhead !== undefined ? ours <= peerOverhead : null,
    );
  }

  // 1b. For reading: the same overheads over each app's route behind an interceptor that does
  // nothing, which sets NestJS 12's interceptor pipeline (ours) apart from NestJS 10's (the peer's).
  const overPassThrough = (route: string, passThrough: string) =>
    app(routeOf(pg, route)) !== undefined && app(routeOf(pg, passThrough)) !== undefined
      ? app(routeOf(pg, route))! - app(routeOf(pg, passThrough))!
      : undefined;
  const pipeline = overPassThrough('pass_through', 'plain');
  const peerPipeline = overPassThrough('peer_redis_pass_through', 'peer_redis_plain');
  if (pipeline !== undefined && peerPipeline !== undefined) {
    const parts = [
      ['PostgreSQL', overPassThrough('first', 'pass_through')],
      ['the Redis store', overPassThrough('redis_first', 'pass_through')],
      ['peer', overPassThrough('peer_redis', 'peer_redis_pass_through')],
      ['replay, PostgreSQL', overPassThrough('replay', 'pass_through')],
    ] as const;
    push(
      'app CPU of an interceptor that does nothing, over the plain route: NestJS 12 (ours) vs 10 (the peer’s); then fresh key (and replay) over it (for reading)',
      `NestJS 12 ${signed(pipeline)}, NestJS 10 ${signed(peerPipeline)}; over it: ${parts
        .map(([label, value]) => `${label} ${value === undefined ? '–' : signed(value)}`)
        .join(
          ', ',
        )}${warn(pg, ['pass_through', 'plain', 'peer_redis_pass_through', 'peer_redis_plain'])}`,
      null,
    );
  }

  // 2. A completed key (replay) costs the app no more CPU than the plain route, on every store.
  for (const [label, database, replay, plain] of [
    ['PostgreSQL', pg, 'replay', 'plain'],
    ['PGlite', lite, 'replay', 'plain'],
    ['the Redis store', pg, 'redis_replay', 'redis_plain'],
  ] as const) {
    const mine = app(routeOf(database, replay));
    const base = app(routeOf(database, plain));
    push(
      `completed key (replay), ${label}: app CPU ≤ the plain route's`,
      mine !== undefined && base !== undefined
        ? `${ms(mine)} vs ${ms(base)}${warn(database, [replay, plain])}`
        : null,
      mine !== undefined && base !== undefined ? mine <= base : null,
    );
  }

  // 3. PostgreSQL's CPU per fresh key, against one plain INSERT (the `write` route's).
  const pgCpu = (name: string) => routeOf(pg, name)?.cpu_ms_per_req.postgres_ms;
  const insert = pgCpu('write');
  for (const [name, label, bound] of [
    ['first', 'fresh key', 1],
    ['write_first', 'realistic handler (one INSERT), fresh key', 2],
    ['write_tx', 'realistic handler, transactional, fresh key', 2],
  ] as const) {
    const value = pgCpu(name);
    push(
      `PostgreSQL CPU per request, ${label} ≤ ${bound}× one plain INSERT's (the \`write\` route)`,
      value !== undefined && insert
        ? `${ms(value)} = ${(value / insert).toFixed(2)}× ${ms(insert)}${warn(pg, [name, 'write'])}`
        : null,
      value !== undefined && insert ? value <= bound * insert : null,
    );
  }

  // 4. Throughput: PGlite's `first` over plain; PostgreSQL's `first` against its free-library bound.
  const liteRatio = routeOf(lite, 'first')?.ratio_to_plain;
  push(
    'PGlite first ≥ 0.45× plain (req/s)',
    liteRatio != null ? `${liteRatio.toFixed(2)}${warn(lite, ['first', 'plain'])}` : null,
    liteRatio != null ? liteRatio >= 0.45 : null,
  );
  for (const [name, base] of [
    ['first', 'plain'],
    ['write_first', 'write'],
    ['write_tx', 'write'],
  ] as const) {
    const bound = freeLibraryBound(routeOf(pg, name), routeOf(pg, base));
    const ratio = routeOf(pg, name)?.ratio_to_plain;
    const share = bound && ratio != null ? ratio / bound.bound : null;
    push(
      `PostgreSQL ${name} ≥ 0.9× the bound of a library whose own code cost nothing${name === 'first' ? '' : ' (for reading)'}`,
      share !== null
        ? `${ratio!.toFixed(2)} of ${base}, bound ${bound!.bound.toFixed(2)}: ${share.toFixed(2)}× the bound${warn(pg, [name, base])}`
        : null,
      share !== null && name === 'first' ? share >= 0.9 : null,
    );
  }

  // 5. Tail latency.
  for (const [label, database, first, plain] of [
    ['PostgreSQL', pg, 'first', 'plain'],
    ['PGlite', lite, 'first', 'plain'],
    ['the Redis store', pg, 'redis_first', 'redis_plain'],
  ] as const) {
    const p99 = routeOf(database, first)?.p99_ms;
    const base = routeOf(database, plain)?.p99_ms;
    push(
      `p99 of first ≤ 1.5× plain's p99, ${label}`,
      p99 != null && base
        ? `${p99} vs ${base} ms = ${(p99 / base).toFixed(2)}×${warn(database, [first, plain])}`
        : null,
      p99 != null && base ? p99 <= 1.5 * base : null,
    );
  }

  // 6. Memory, for reading.
  for (const [name, memory] of Object.entries(extras.inFlight ?? {})) {
    if (!memory) continue;
    push(
      `memory per in-flight request / per running lease, ${name}`,
      `${memory.plain_kib_per_request} KiB per request without @Idempotent, ${memory.idempotent_kib_per_request} KiB with; ${memory.kib_per_lease} KiB per running lease (heap, ${memory.requests} held at once)`,
      null,
    );
  }
  const updates = extras.storeBatching?.updates;
  if (updates) {
    push(
      'completions as HOT updates (PostgreSQL, the store alone, pg_stat_user_tables)',
      `${updates.hot.toLocaleString('en')} of ${updates.all.toLocaleString('en')} updates HOT (${updates.all ? Math.round((100 * updates.hot) / updates.all) : 0} %)`,
      null,
    );
  }

  // Standing targets of earlier issues.
  const growth = pg?.growth;
  if (growth) {
    const sizes = `${growth.points[0].rows.toLocaleString('en')}→${growth.points[growth.points.length - 1].rows.toLocaleString('en')}`;
    push(
      `lookup p50 flat ${sizes} (ratio ≤ 1.2)`,
      growth.lookup_p50_ratio.toFixed(2),
      growth.lookup_p50_ratio <= 1.2,
    );
  }
  const purge = pg?.purge_rows_per_s;
  push(
    'purge ≥ 100,000 rows/s (PostgreSQL, under load)',
    purge == null ? null : `${purge.toLocaleString('en')} rows/s`,
    purge == null ? null : purge >= 100_000,
  );
  return checks;
}

/**
 * The profile summary beside the targets: per app, the library's own CPU per `first` and `replay`
 * request (self time in dist/lib, from the profile) and its costliest functions.
 */
export function profileSummaryLines(profiles: readonly ProfileSummary[]): string[] {
  return profiles.map((profile) => {
    const library = (times: ProfileSummary['first']) => times['nestjs-idempotency'] ?? 0;
    const top = profile.libraryTop
      .slice(0, 5)
      .map(({ fn, us_per_req }) => `${fn} ${us_per_req} µs`)
      .join(', ');
    return `- ${profile.target}: the library's own code ${library(profile.first).toFixed(3)} ms per \`first\` request, ${library(profile.replay).toFixed(3)} ms per \`replay\`; costliest on \`first\`: ${top || '–'}`;
  });
}
