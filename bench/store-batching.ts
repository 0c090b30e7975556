import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { IdempotencyRecord, TypeOrmIdempotencyStore } from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { BENCH_CONFIG } from './bench-config.js';
import { cpuPerRequest, cpuSnapshot } from './cpu-usage.js';
import { median, round } from './stats.js';

/** One side of the comparison: the store with statements batched, or one statement per request. */
export interface StoreBatchingFigures {
  readonly rps: number;
  readonly app_cpu_ms: number;
  readonly postgres_cpu_ms: number;
}

export interface StoreBatchingResult {
  readonly operations: number;
  readonly workers: number;
  readonly batched: StoreBatchingFigures;
  readonly single: StoreBatchingFigures;
  /**
   * The completions (UPDATEs) of this measurement, as PostgreSQL counted them on the table
   * (pg_stat_user_tables): all of them, and those that were HOT (no index touched).
   */
  readonly updates: { readonly all: number; readonly hot: number } | null;
}

const WORKERS = 20;
const OPERATIONS = 3000;
const ROUNDS = 3;

/**
 * The store alone, in this process, on PostgreSQL: `WORKERS` concurrent callers each claim a fresh
 * key and complete it, `OPERATIONS` in all, with `batchStatements` on and off in alternating
 * rounds (medians). No HTTP, so the difference is the statements' alone: round trips, commits,
 * and the CPU of this process and of PostgreSQL per first request.
 */
export async function measureStoreBatching(): Promise<StoreBatchingResult> {
  const dataSource = new DataSource({
    type: 'postgres',
    url: BENCH_CONFIG.databaseUrl,
    schema: BENCH_CONFIG.schema,
    entities: [IdempotencyRecord],
    extra: { max: 10, idleTimeoutMillis: 0 },
  });
  await dataSource.initialize();
  await ensureIdempotencyTable(dataSource);
  const updatesBefore = await tableUpdates(dataSource);
  const stores = {
    batched: new TypeOrmIdempotencyStore(dataSource, { waitNotifications: false }),
    single: new TypeOrmIdempotencyStore(dataSource, {
      waitNotifications: false,
      batchStatements: false,
    }),
  };
  const samples: Record<'batched' | 'single', StoreBatchingFigures[]> = { batched: [], single: [] };
  try {
    for (let roundIndex = 0; roundIndex < ROUNDS + 1; roundIndex++) {
      for (const side of ['batched', 'single'] as const) {
        const figures = await load(stores[side], `${side}-${roundIndex}`);
        if (roundIndex > 0) samples[side].push(figures); // round 0 warms the pool and the plans
      }
    }
  } finally {
    await dataSource.destroy();
  }
  // A backend reports its counts when it exits: read them on a connection of its own.
  const after = new DataSource({ type: 'postgres', url: BENCH_CONFIG.databaseUrl });
  await after.initialize();
  let updates: StoreBatchingResult['updates'] = null;
  try {
    const expected = (ROUNDS + 1) * 2 * OPERATIONS;
    const deadline = Date.now() + 15_000;
    for (;;) {
      const now = await tableUpdates(after);
      if (now && updatesBefore) {
        updates = { all: now.all - updatesBefore.all, hot: now.hot - updatesBefore.hot };
        if (updates.all >= expected || Date.now() > deadline) break;
      } else break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  } finally {
    await after.destroy();
  }
  const summary = (runs: StoreBatchingFigures[]): StoreBatchingFigures => ({
    rps: round(median(runs.map((run) => run.rps)), 0),
    app_cpu_ms: round(median(runs.map((run) => run.app_cpu_ms)), 3),
    postgres_cpu_ms: round(median(runs.map((run) => run.postgres_cpu_ms)), 3),
  });
  return {
    operations: OPERATIONS,
    workers: WORKERS,
    batched: summary(samples.batched),
    single: summary(samples.single),
    updates,
  };
}

/** The bench table's updates so far, all and HOT, as PostgreSQL's statistics count them. */
async function tableUpdates(dataSource: DataSource) {
  const rows = await dataSource.query<{ all: number; hot: number }[]>(
    `SELECT n_tup_upd::int AS "all", n_tup_hot_upd::int AS hot FROM pg_stat_user_tables
      WHERE relid = to_regclass($1)`,
    [`${BENCH_CONFIG.schema}.idempotency_records`],
  );
  return rows[0] ?? null;
}

async function load(store: TypeOrmIdempotencyStore, tag: string): Promise<StoreBatchingFigures> {
  let started = 0;
  const response = {
    status: 201,
    headers: { 'content-type': 'application/json' },
    body: '{"id":"ord_1","amount":1250}',
    bodyEncoding: 'json' as const,
    isError: false,
  };
  const before = cpuSnapshot(process.pid);
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: WORKERS }, async () => {
      while (started < OPERATIONS) {
        const id = {
          scope: '',
          endpoint: 'POST /bench-store',
          key: `${tag}-${Date.now()}-${started++}`,
        };
        const now = Date.now();
        const claim = await store.claim({
          id,
          fingerprint: 'fp',
          token: randomUUID(),
          now,
          lockedUntil: now + 60_000,
          ttlMs: 86_400_000,
        });
        if (!claim.claimed) throw new Error('a fresh key was not claimed');
        if (!(await store.complete(claim.lease, response, now + 86_400_000)))
          throw new Error('a held lease did not complete');
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const cpu = cpuPerRequest(before, cpuSnapshot(process.pid), OPERATIONS);
  // This process runs the store: its CPU is the `app` group of the snapshot.
  return { rps: OPERATIONS / seconds, app_cpu_ms: cpu.app_ms, postgres_cpu_ms: cpu.postgres_ms };
}
