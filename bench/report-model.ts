import type { CpuPerRequest } from './cpu-usage.js';
import type { MachineInfo } from './environment.js';
import type { GrowthResult } from './growth.js';
import type { MemoryResult, PurgeResult } from './purge-and-memory.js';
import type { QueriesPerRequest, RouteName, Samples, TargetName } from './route-rounds.js';
import { median, round } from './stats.js';
import type { WaiterDelayResult } from './waiter-delay.js';
import type { ProfileSummary } from './profile.js';
import type { StoreBatchingResult } from './store-batching.js';

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
    for (const route of ['first', 'replay'] as const) {
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

/** A target of issue 11, checked against the run's figures. */
export interface TargetCheck {
  readonly target: string;
  readonly measured: string;
  readonly met: boolean | null;
}

export function checkTargets(results: BenchResults): TargetCheck[] {
  const pg = results.postgres;
  const lite = results.pglite;
  const checks: TargetCheck[] = [];
  // A ratio over routes that had failed requests is not a measurement of the happy path: say so.
  const failed = (names: string[]) =>
    names.some(
      (name) =>
        (pg?.routes[name]?.non2xx ?? 0) +
          (pg?.routes[name]?.errors ?? 0) +
          (lite?.routes[name]?.non2xx ?? 0) >
        0,
    );
  const check = (
    target: string,
    value: number | null | undefined,
    met: (value: number) => boolean,
    routes: string[],
  ) =>
    checks.push({
      target,
      measured:
        value == null
          ? 'not measured'
          : `${value.toFixed(2)}${failed(routes) ? ' (⚠ failed requests in these routes)' : ''}`,
      met: value == null ? null : met(value),
    });
  const atLeast = (
    label: string,
    value: number | null | undefined,
    goal: number,
    routes: string[],
  ) => check(`${label} ≥ ${goal}`, value, (measured) => measured >= goal, routes);
  const rps = (name: string) => pg?.routes[name]?.rps;
  const over = (a: number | undefined, b: number | undefined) => (a && b ? a / b : null);
  /** Our overhead against the peer's, each over its own plain app: ≥ 1 means ours costs no more. */
  const overhead = (label: string, ours: string, ourPlain: string, peer: string) => {
    const mine = over(rps(ours), rps(ourPlain));
    const theirs = over(rps(peer), rps('peer_redis_plain'));
    check(
      `${label}: ours ÷ our plain ≥ peer ÷ its plain (${mine?.toFixed(2) ?? '?'} vs ${theirs?.toFixed(2) ?? '?'})`,
      mine && theirs ? mine / theirs : null,
      (ratio) => ratio >= 1,
      [ours, ourPlain, peer, 'peer_redis_plain'],
    );
  };
  atLeast('PostgreSQL first / plain', pg?.routes.first?.ratio_to_plain, 0.6, ['first', 'plain']);
  atLeast('PostgreSQL replay / plain', pg?.routes.replay?.ratio_to_plain, 0.9, ['replay', 'plain']);
  overhead('fresh keys, PostgreSQL vs peer on Redis', 'first', 'plain', 'peer_redis');
  overhead('completed keys, PostgreSQL vs peer on Redis', 'replay', 'plain', 'peer_redis_replay');
  overhead(
    'fresh keys, our Redis store vs peer on Redis',
    'redis_first',
    'redis_plain',
    'peer_redis',
  );
  overhead(
    'completed keys, our Redis store vs peer on Redis',
    'redis_replay',
    'redis_plain',
    'peer_redis_replay',
  );
  atLeast('PGlite first / plain', lite?.routes.first?.ratio_to_plain, 0.4, ['first', 'plain']);
  atLeast('PGlite replay / plain', lite?.routes.replay?.ratio_to_plain, 0.7, ['replay', 'plain']);
  atLeast(
    'PostgreSQL realistic handler: idempotent / without',
    pg?.routes.write_first?.ratio_to_plain,
    0.8,
    ['write_first', 'write'],
  );
  atLeast(
    'PostgreSQL realistic handler: transactional / without',
    pg?.routes.write_tx?.ratio_to_plain,
    0.85,
    ['write_tx', 'write'],
  );
  const p99 = over(pg?.routes.first?.p99_ms, pg?.routes.plain?.p99_ms);
  check('PostgreSQL first p99 / plain p99 ≤ 2', p99, (ratio) => ratio <= 2, ['first', 'plain']);
  const growth = pg?.growth;
  if (growth) {
    const sizes = `${growth.points[0].rows.toLocaleString('en')}→${growth.points[growth.points.length - 1].rows.toLocaleString('en')}`;
    checks.push({
      target: `lookup p50 flat ${sizes} (ratio ≤ 1.2)`,
      measured: growth.lookup_p50_ratio.toFixed(2),
      met: growth.lookup_p50_ratio <= 1.2,
    });
  }
  const purge = pg?.purge_rows_per_s;
  checks.push({
    target: 'purge ≥ 100,000 rows/s (PostgreSQL, under load)',
    measured: purge == null ? 'not measured' : `${purge.toLocaleString('en')} rows/s`,
    met: purge == null ? null : purge >= 100_000,
  });
  return checks;
}
