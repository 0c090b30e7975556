import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BENCH_CONFIG, PEER_DIR, ROUTES } from './bench-config.js';
import { startChild, type ChildApp } from './child-process.js';
import { cpuPerRequest, cpuSnapshot, type CpuPerRequest } from './cpu-usage.js';
import type { Services } from './environment.js';
import { postOnce, runLoad, seedKeys, type KeyPlan, type LoadResult } from './load.js';
import type { QueryCounts } from './query-counter.js';

export type TargetName = 'postgres' | 'pglite' | 'redis' | 'peer_redis' | 'peer_memory';
export type RouteName =
  'plain' | 'pass_through' | 'first' | 'replay' | 'write' | 'write_first' | 'write_tx';
export const ROUTE_NAMES: readonly RouteName[] = ['plain', 'first', 'replay'];
/**
 * The handler behind an interceptor that does nothing: what the framework's interceptor pipeline
 * alone costs (NestJS 12 in our app, 10 in the peer's). Loaded on our PostgreSQL app and on the
 * peer's Redis app: a route of the app, whatever its store.
 */
const PASS_THROUGH: readonly RouteName[] = ['pass_through'];
/** Our apps also load the realistic handler: one INSERT, without, with and transactional. */
const OUR_ROUTE_NAMES: readonly RouteName[] = [...ROUTE_NAMES, 'write', 'write_first', 'write_tx'];

export const ROUTE_PATHS: Record<RouteName, string> = {
  plain: ROUTES.plain,
  pass_through: ROUTES.passThrough,
  first: ROUTES.idempotent,
  replay: ROUTES.idempotent,
  write: ROUTES.write,
  write_first: ROUTES.writeIdempotent,
  write_tx: ROUTES.writeTransactional,
};

/** An app under load, with the completed keys its `replay` route cycles through. */
export interface Target {
  readonly name: TargetName;
  readonly app: ChildApp;
  readonly replayKeys: readonly string[];
  readonly routes: readonly RouteName[];
}

/** One load of one route, with where its CPU went. */
export type RouteSample = LoadResult & { readonly cpu: CpuPerRequest };

/** Every round's result, per target and route. */
export type Samples = Map<`${TargetName}:${RouteName}`, RouteSample[]>;

const APP_PROCESS = fileURLToPath(new URL('./app-process.js', import.meta.url));

/** Starts every target the machine can run, one process each, and seeds its replay keys. */
export async function startTargets(
  services: Services,
  log: (line: string) => void,
): Promise<Target[]> {
  const wanted: { name: TargetName; start: () => Promise<ChildApp> }[] = [];
  const env = {
    BENCH_DATABASE_URL: BENCH_CONFIG.databaseUrl,
    BENCH_SCHEMA: BENCH_CONFIG.schema,
    BENCH_REDIS_URL: BENCH_CONFIG.redisUrl,
  };
  const ours = (database: string) => () =>
    startChild({ name: `app (${database})`, script: APP_PROCESS, args: [database], env });
  const peer = (adapter: string) => () =>
    startChild({
      name: `peer (${adapter})`,
      script: join(PEER_DIR, 'peer-app.cjs'),
      args: [adapter],
      cwd: PEER_DIR,
      env,
    });
  if (services.postgres) wanted.push({ name: 'postgres', start: ours('postgres') });
  wanted.push({ name: 'pglite', start: ours('pglite') });
  // Ours on Redis: like for like with the peer on Redis.
  if (services.redis) wanted.push({ name: 'redis', start: ours('redis') });
  if (services.peer && services.redis) wanted.push({ name: 'peer_redis', start: peer('redis') });
  if (services.peer) wanted.push({ name: 'peer_memory', start: peer('memory') });

  // In parallel: PGlite's start and its slow seeding overlap with the others'.
  return Promise.all(
    wanted.map(async ({ name, start }): Promise<Target> => {
      const started = performance.now();
      const app = await start();
      const up = performance.now();
      const replayKeys = Array.from(
        { length: BENCH_CONFIG.replayKeys },
        (_, i) => `replay-${name}-${i}`,
      );
      await seedKeys(app.port, ROUTES.idempotent, replayKeys);
      // A replay run on keys that do not replay would measure `first`: check before measuring.
      const probe = await postOnce(app.port, ROUTES.idempotent, replayKeys[0]);
      if (!probe.replayed)
        throw new Error(`${name}: a seeded key did not replay (status ${probe.status})`);
      log(
        `${name} up in ${((up - started) / 1000).toFixed(1)} s, ${replayKeys.length} keys seeded in ${((performance.now() - up) / 1000).toFixed(1)} s`,
      );
      // The peer's plain route is the same NestJS 10 app whatever its adapter: loaded once, on Redis
      // (or in memory when Redis is absent), to save a route per round.
      const peerPlainElsewhere =
        name === 'peer_memory' && wanted.some((other) => other.name === 'peer_redis');
      const ours = name === 'postgres' || name === 'pglite';
      const routes: readonly RouteName[] = peerPlainElsewhere
        ? ['first', 'replay']
        : ours
          ? OUR_ROUTE_NAMES
          : ROUTE_NAMES;
      const passThrough = name === 'postgres' || name === 'peer_redis';
      return {
        name,
        app,
        replayKeys,
        routes: passThrough ? [...routes, ...PASS_THROUGH] : routes,
      };
    }),
  );
}

function keyPlan(target: Target, route: RouteName, tag: string): KeyPlan {
  if (route === 'plain' || route === 'write' || route === 'pass_through') return { kind: 'none' };
  if (route === 'replay') return { kind: 'cycle', keys: target.replayKeys };
  return { kind: 'fresh', prefix: `${route}-${target.name}-${tag}-${Date.now()}` };
}

async function loadRoute(
  target: Target,
  route: RouteName,
  durationS: number,
  tag: string,
): Promise<RouteSample> {
  const before = cpuSnapshot(target.app.pid);
  const result = await runLoad({
    port: target.app.port,
    path: ROUTE_PATHS[route],
    keys: keyPlan(target, route, tag),
    connections: BENCH_CONFIG.connections,
    durationS,
  });
  return { ...result, cpu: cpuPerRequest(before, cpuSnapshot(target.app.pid), result.requests) };
}

/**
 * A short warm-up of every route (JIT, pools, caches), then `rounds` rounds. Each round loads every
 * target's routes once, starting from a different target each time, so slow drift (a warming page
 * cache, a growing table, the other engineers' test runs) spreads over all targets alike.
 */
export async function runRounds(
  targets: readonly Target[],
  log: (line: string) => void,
): Promise<Samples> {
  for (const target of targets) {
    for (const route of target.routes) await loadRoute(target, route, 1, 'warmup');
  }
  const samples: Samples = new Map();
  for (let round = 0; round < BENCH_CONFIG.rounds; round++) {
    const order = targets.map((_, i) => targets[(i + round) % targets.length]);
    for (const target of order) {
      for (const route of target.routes) {
        const result = await loadRoute(target, route, BENCH_CONFIG.durationS, `r${round}`);
        const bad = result.non2xx + result.errors;
        log(
          `round ${round + 1}/${BENCH_CONFIG.rounds} ${target.name.padEnd(11)} ${route.padEnd(6)} ` +
            `${result.rps.toFixed(0).padStart(6)} req/s  p50 ${result.p50_ms} ms  p99 ${result.p99_ms} ms` +
            `  CPU ms/req app ${result.cpu.app_ms}, pg ${result.cpu.postgres_ms}, redis ${result.cpu.redis_ms}, other ${result.cpu.other_ms}` +
            (bad > 0 ? `  (${result.non2xx} non-2xx, ${result.errors} errors)` : ''),
        );
        const key = `${target.name}:${route}` as const;
        samples.set(key, [...(samples.get(key) ?? []), result]);
      }
    }
  }
  return samples;
}

export interface QueriesPerRequest {
  readonly first: number;
  readonly replay: number;
  /** Wire-level round trips (pg driver) per request, PostgreSQL only. */
  readonly first_wire: number | null;
  readonly replay_wire: number | null;
  readonly statements: {
    readonly first: Record<string, number>;
    readonly replay: Record<string, number>;
  };
  /**
   * Our apps' realistic handler (one INSERT): statements and commits per request, behind
   * `@Idempotent()` and in the transactional mode (where the completion adds no commit).
   */
  readonly write: {
    readonly idempotent: { readonly statements: Record<string, number>; readonly commits: number };
    readonly transactional: {
      readonly statements: Record<string, number>;
      readonly commits: number;
    };
  } | null;
}

/**
 * Statements per request, counted in the app while nothing else runs: `requests` sequential
 * requests with fresh keys, then as many replays. Sequential so the count is exact per request.
 */
export async function countQueries(target: Target, requests = 200): Promise<QueriesPerRequest> {
  const measure = async (keyOf: (i: number) => string, path: string = ROUTES.idempotent) => {
    await target.app.command('queries-reset');
    for (let i = 0; i < requests; i++) {
      const { status } = await postOnce(target.app.port, path, keyOf(i));
      if (status !== 201) throw new Error(`${target.name}: counting request answered ${status}`);
    }
    return target.app.command<QueryCounts>('queries-read');
  };
  const stamp = Date.now();
  const first = await measure((i) => `count-${stamp}-${i}`);
  const replay = await measure((i) => target.replayKeys[i % target.replayKeys.length]);
  const per = (count: number) => Math.round((count / requests) * 100) / 100;
  const perStatement = (counts: QueryCounts) =>
    Object.fromEntries(
      Object.entries(counts.byStatement).map(([label, count]) => [label, per(count)]),
    );
  const writeOf = async (path: string) => {
    const counts = await measure((i) => `count-${path}-${stamp}-${i}`, path);
    return { statements: perStatement(counts), commits: per(counts.commits) };
  };
  const ours = target.routes.includes('write_tx');
  return {
    write: ours
      ? {
          idempotent: await writeOf(ROUTES.writeIdempotent),
          transactional: await writeOf(ROUTES.writeTransactional),
        }
      : null,
    first: per(first.typeorm),
    replay: per(replay.typeorm),
    first_wire: first.wire === null ? null : per(first.wire),
    replay_wire: replay.wire === null ? null : per(replay.wire),
    statements: { first: perStatement(first), replay: perStatement(replay) },
  };
}
