import { DataSource } from 'typeorm';
import { IdempotencyRecord, TypeOrmIdempotencyStore } from '../lib/index.js';
import { DEFAULTS } from '../lib/idempotency.constants.js';
import { BENCH_CONFIG, ROUTES } from './bench-config.js';
import { withClient } from './environment.js';
import { decidingStatement, explainRolledBack, withParameters } from './explain.js';
import { QueryCounter } from './query-counter.js';
import { runLoad, type LoadResult } from './load.js';
import type { Target } from './route-rounds.js';
import { round } from './stats.js';
import { bulkInsertSql } from './synthetic-rows.js';

/** Waiting requests in the app's pg pool, sampled every 250 ms during a load. */
export interface PoolWaiting {
  readonly pool_size: number;
  readonly mean_waiting: number;
  readonly max_waiting: number;
}

export interface PurgeResult {
  readonly expired_rows: number;
  readonly deleted: number;
  readonly seconds: number;
  readonly rows_per_s: number;
  readonly batch_size: number;
  readonly insert_s: number;
  /** Expired rows still there afterwards (0 unless the purge stopped early). */
  readonly left_over: number;
  readonly first_without_purge: LoadResult & { readonly pool: PoolWaiting | null };
  readonly first_during_purge: LoadResult & { readonly pool: PoolWaiting | null };
  /** The same load again after the purge: one baseline alone can land on a checkpoint or a burst. */
  readonly first_after_purge: LoadResult & { readonly pool: PoolWaiting | null };
  /** EXPLAIN (ANALYZE, BUFFERS, WAL) of one purge batch with the expired rows in place. */
  readonly explain: string;
}

export interface MemoryResult {
  readonly requests: number;
  /** The number asked for; fewer were sent when the run's time budget ran out (`capped`). */
  readonly target_requests: number;
  readonly capped: boolean;
  readonly rss_before_mb: number;
  /** After the first load (pool filled, code compiled): the start of the steady state. */
  readonly rss_warm_mb: number;
  readonly requests_warm: number;
  readonly rss_after_mb: number;
  readonly rss_growth_mb: number;
  /** From warm to after: what the steady state added, the figure that says "bounded" or not. */
  readonly rss_growth_after_warm_mb: number;
  readonly heap_before_mb: number;
  readonly heap_warm_mb: number;
  readonly heap_after_mb: number;
  readonly gc_forced: boolean;
  /** The `first` load that made up the rest of the requests after the purge phase's. */
  readonly top_up: LoadResult | null;
}

interface MemoryReading {
  rss: number;
  heapUsed: number;
  gcForced: boolean;
}

const mb = (bytes: number) => round(bytes / 2 ** 20, 1);
const freshKeys = (tag: string) => ({ kind: 'fresh', prefix: `${tag}-${Date.now()}` }) as const;

/** A `first`-route load on the app, sampling its pool while it runs. */
async function loadFirst(
  target: Target,
  tag: string,
  extra: { durationS?: number; amount?: number; onStart?: (stop: () => void) => void },
) {
  const samples: number[] = [];
  let poolSize = 0;
  const timer = setInterval(() => {
    target.app.command<{ total: number; waiting: number } | null>('pool').then(
      (pool) => {
        if (pool) {
          samples.push(pool.waiting);
          poolSize = Math.max(poolSize, pool.total);
        }
      },
      () => undefined,
    );
  }, 250);
  try {
    const result = await runLoad({
      port: target.app.port,
      path: ROUTES.idempotent,
      keys: freshKeys(tag),
      connections: BENCH_CONFIG.connections,
      ...extra,
    });
    const pool: PoolWaiting | null = samples.length
      ? {
          pool_size: poolSize,
          mean_waiting: round(samples.reduce((a, b) => a + b, 0) / samples.length, 1),
          max_waiting: Math.max(...samples),
        }
      : null;
    return { ...result, pool };
  } finally {
    clearInterval(timer);
  }
}

/**
 * Memory and purge on one app, in one sequence of `first` loads (together they fit the time
 * budget; apart, 100k requests plus a purge phase would not):
 *
 * 1. RSS after a forced GC;
 * 2. `first` load without purge (the p99 to compare with; again after the purge), then RSS again:
 *    the warm reading (pool connections open, code compiled), where the steady state starts;
 * 3. `purgeRows` expired records bulk-inserted into the app's table, then the app's own
 *    `IdempotencyPurgeJob.purgeNow()` (library default batch size) deletes them while `first` is
 *    loaded; that load stops when the purge returns;
 * 4. more `first` requests until `memoryRequests` in all, then RSS after a forced GC.
 *
 * Without `purgeRows` (PGlite) it is steps 1, 2 and 4.
 */
export async function measureMemoryAndPurge(
  target: Target,
  options: { memoryRequests: number; purgeRows: number | null; topUpDeadline: number },
  log: (line: string) => void,
): Promise<{ memory: MemoryResult; purge: PurgeResult | null }> {
  const before = await target.app.command<MemoryReading>('memory');
  const without = await loadFirst(target, 'nopurge', { durationS: BENCH_CONFIG.durationS * 2 });
  log(
    `${target.name}: first without purge ${without.rps.toFixed(0)} req/s, p99 ${without.p99_ms} ms`,
  );
  const warm = await target.app.command<MemoryReading>('memory');
  let sent = without.requests;
  let purge: PurgeResult | null = null;
  if (options.purgeRows) {
    purge = await purgeUnderLoad(target, options.purgeRows, without, log);
    sent += purge.first_during_purge.requests + purge.first_after_purge.requests;
  }
  const remaining = options.memoryRequests - sent;
  let topUp: LoadResult | null = null;
  const timeLeftMs = options.topUpDeadline - performance.now();
  if (remaining > 0 && timeLeftMs > 5000) {
    log(
      `${target.name}: ${remaining.toLocaleString('en')} more first requests for the memory reading${Number.isFinite(timeLeftMs) ? ` (at most ${Math.round(timeLeftMs / 1000)} s)` : ''}`,
    );
    // On a slow or busy machine the run's time budget wins: the load stops early and says so.
    // (setTimeout cannot take Infinity: soak mode's unbounded budget sets no timer.)
    const onStart = Number.isFinite(timeLeftMs)
      ? (stop: () => void) => void setTimeout(stop, timeLeftMs).unref()
      : undefined;
    topUp = await loadFirst(target, 'memory', { amount: remaining, onStart });
    sent += topUp.requests;
  }
  const after = await target.app.command<MemoryReading>('memory');
  const memory: MemoryResult = {
    requests: sent,
    target_requests: options.memoryRequests,
    capped: sent < options.memoryRequests,
    rss_before_mb: mb(before.rss),
    rss_warm_mb: mb(warm.rss),
    requests_warm: without.requests,
    rss_after_mb: mb(after.rss),
    rss_growth_mb: mb(after.rss - before.rss),
    rss_growth_after_warm_mb: mb(after.rss - warm.rss),
    heap_before_mb: mb(before.heapUsed),
    heap_warm_mb: mb(warm.heapUsed),
    heap_after_mb: mb(after.heapUsed),
    gc_forced: after.gcForced,
    top_up: topUp,
  };
  return { memory, purge };
}

async function purgeUnderLoad(
  target: Target,
  rows: number,
  without: PurgeResult['first_without_purge'],
  log: (line: string) => void,
): Promise<PurgeResult> {
  const table = `${BENCH_CONFIG.schema}.idempotency_records`;
  const insertStarted = performance.now();
  const expiredAt = Date.now() - 3_600_000;
  await withClient(async (client) => {
    await client.query(bulkInsertSql(table, 0, rows, expiredAt, 'expired-'));
    await client.query(`ANALYZE ${table}`);
  });
  const insert_s = (performance.now() - insertStarted) / 1000;
  log(
    `purge: inserted ${rows.toLocaleString('en')} expired rows in ${insert_s.toFixed(1)} s; purging under first-route load`,
  );
  const explain = await explainPurge();

  let purge: { deleted: number; ms: number } | undefined;
  let failure: unknown;
  const during = await loadFirst(target, 'purge', {
    durationS: 600,
    onStart: (stop) => {
      target.app
        .command<{ deleted: number; ms: number }>('purge')
        .then(
          (result) => (purge = result),
          (error: unknown) => (failure = error),
        )
        .finally(stop);
    },
  });
  if (!purge) throw new Error('purge: the purge command did not answer', { cause: failure });
  const after = await loadFirst(target, 'afterpurge', { durationS: BENCH_CONFIG.durationS * 2 });
  const left_over = await withClient(async (client) => {
    const { rows: counted } = await client.query<{ n: string }>(
      `SELECT count(*) AS n FROM ${table} WHERE expires_at <= $1`,
      [expiredAt],
    );
    return Number(counted[0].n);
  });
  const seconds = purge.ms / 1000;
  return {
    expired_rows: rows,
    deleted: purge.deleted,
    seconds: round(seconds),
    rows_per_s: Math.round(purge.deleted / seconds),
    batch_size: DEFAULTS.purgeBatchSize,
    insert_s: round(insert_s),
    left_over,
    first_without_purge: without,
    first_during_purge: during,
    first_after_purge: after,
    explain,
  };
}

/** Bounds no real purge uses: the captured statement's parameters are found by these values. */
const PROBE_NOW = 1;
const PROBE_LIMIT = 4321;

/**
 * The store's own purge statement, captured while it purges nothing (rows expired before 1970),
 * then explained for one real batch in a rolled-back transaction.
 */
async function explainPurge(): Promise<string> {
  const counter = new QueryCounter();
  const dataSource = new DataSource({
    type: 'postgres',
    url: BENCH_CONFIG.databaseUrl,
    schema: BENCH_CONFIG.schema,
    entities: [IdempotencyRecord],
    logger: counter,
  });
  await dataSource.initialize();
  try {
    const store = new TypeOrmIdempotencyStore(dataSource);
    const { statements } = await counter.capture(() => store.purgeExpired(PROBE_NOW, PROBE_LIMIT));
    const swaps = new Map<unknown, unknown>([
      [PROBE_NOW, Date.now()],
      [PROBE_LIMIT, DEFAULTS.purgeBatchSize],
    ]);
    return await explainRolledBack(
      dataSource,
      withParameters(decidingStatement(statements, 'purge'), swaps),
    );
  } finally {
    await dataSource.destroy();
  }
}
