import { randomUUID } from 'node:crypto';
import { DataSource, type DataSourceOptions } from 'typeorm';
import { PGliteDriver } from 'typeorm-pglite';
import { IdempotencyRecord, TypeOrmIdempotencyStore } from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { DEFAULTS } from '../lib/idempotency.constants.js';
import { BENCH_CONFIG } from './bench-config.js';
import { decidingStatement, explainRolledBack, withParameters } from './explain.js';
import { QueryCounter } from './query-counter.js';
import { dropSchema, resetSchema } from './environment.js';
import { summarize, type LatencySummary } from './stats.js';
import { bulkInsertSql, SYNTHETIC_ENDPOINT, SYNTHETIC_FINGERPRINT } from './synthetic-rows.js';

/** Per table size: sequential single-client latency of the store's statements. */
export interface GrowthPoint {
  readonly rows: number;
  readonly insert_s: number;
  /** `claim` of a key never seen: the insert path (first request). */
  readonly claim_new: LatencySummary;
  /** `claim` of a completed key: the lookup path (replay). */
  readonly claim_existing: LatencySummary;
  /** A plain primary-key SELECT of the same rows: what a read costs on this database and client. */
  readonly select_by_pk: LatencySummary;
}

export interface GrowthResult {
  readonly points: GrowthPoint[];
  /** p50 of the lookup at the largest size over the smallest (target: within 1.2). */
  readonly lookup_p50_ratio: number;
  readonly claim_p50_ratio: number;
  /** EXPLAIN (ANALYZE, BUFFERS, WAL) of the claim, at the largest size (PostgreSQL only). */
  readonly explain: {
    readonly claim_existing: string;
    readonly claim_new: string;
    readonly complete: string;
  } | null;
  /** The store's purge with nothing else running, next to the largest size (PostgreSQL only). */
  readonly purge_idle: {
    readonly rows: number;
    readonly seconds: number;
    readonly rows_per_s: number;
  } | null;
}

/** Expired rows of the idle purge: enough for a steady rate, small enough for the time budget. */
const IDLE_PURGE_ROWS = 200_000;

const GROWTH_SCHEMA = 'bench_growth';
const OPS = 1000;
const WARMUP_OPS = 100;
/**
 * On PostgreSQL every size is a table of its own, all filled first, then timed in this many
 * alternating blocks (OPS / BLOCKS operations each): drift of a shared machine (other sandboxes, a
 * checkpoint) then hits every size alike instead of whichever was timed when it came.
 */
const BLOCKS = 5;

/** One filled records table and the store on it. */
interface SizedTable {
  readonly size: number;
  readonly insert_s: number;
  readonly dataSource: DataSource;
  readonly store: TypeOrmIdempotencyStore;
  readonly table: string;
  readonly counter: QueryCounter;
}

/**
 * Fills records tables of `sizes` with synthetic completed rows (INSERT ... SELECT
 * generate_series) and times the claim at each size. Runs in the runner process, after the load
 * rounds, in schemas of its own so the loaded apps' table is not touched. PostgreSQL: a schema per
 * size, timed in alternating blocks. PGlite (one database per process): one table grown in place,
 * timed after each step.
 */
export async function measureGrowth(
  database: 'postgres' | 'pglite',
  sizes: readonly number[],
): Promise<GrowthResult> {
  const opened: SizedTable[] = [];
  try {
    const points: GrowthPoint[] = [];
    if (database === 'postgres') {
      for (const [index, size] of sizes.entries()) {
        const schema = `${GROWTH_SCHEMA}_${index}`;
        await resetSchema(schema);
        const table = await openTable({ type: 'postgres', url: BENCH_CONFIG.databaseUrl, schema });
        opened.push(table); // closed in `finally` even if the fill fails
        opened[index] = { ...table, size, insert_s: await fill(table, 0, size) };
      }
      points.push(...(await timeAlternating(opened, BLOCKS)));
    } else {
      const table = await openTable({ type: 'postgres', driver: new PGliteDriver().driver });
      opened.push(table);
      let filled = 0;
      for (const size of sizes) {
        const insert_s = await fill(table, filled, size);
        filled = size;
        points.push(...(await timeAlternating([{ ...table, size, insert_s }], 1)));
      }
    }
    const first = points[0];
    const last = points[points.length - 1];
    const largest = opened[opened.length - 1];
    return {
      points,
      lookup_p50_ratio: last.claim_existing.p50_ms / first.claim_existing.p50_ms,
      claim_p50_ratio: last.claim_new.p50_ms / first.claim_new.p50_ms,
      explain:
        database === 'postgres'
          ? await explainStatements(largest.dataSource, largest.store, largest.counter, last.rows)
          : null,
      purge_idle:
        database === 'postgres'
          ? await purgeIdle(largest.dataSource, largest.store, largest.table)
          : null,
    };
  } finally {
    for (const table of opened) await table.dataSource.destroy();
    if (database === 'postgres')
      for (const index of sizes.keys()) await dropSchema(`${GROWTH_SCHEMA}_${index}`);
  }
}

async function openTable(options: DataSourceOptions): Promise<SizedTable> {
  const counter = new QueryCounter();
  const dataSource = new DataSource({ ...options, entities: [IdempotencyRecord], logger: counter });
  await dataSource.initialize();
  await ensureIdempotencyTable(dataSource);
  const table = dataSource.getMetadata(IdempotencyRecord).tablePath;
  return {
    size: 0,
    insert_s: 0,
    dataSource,
    store: new TypeOrmIdempotencyStore(dataSource),
    table,
    counter,
  };
}

/** Adds synthetic completed rows `from`..`to` and refreshes the statistics; returns the seconds. */
async function fill({ dataSource, table }: SizedTable, from: number, to: number): Promise<number> {
  const started = performance.now();
  await dataSource.query(bulkInsertSql(table, from, to, Date.now() + 86_400_000));
  await dataSource.query(`ANALYZE ${table}`);
  return (performance.now() - started) / 1000;
}

/** The three statements' latencies per table, timed in `blocks` rounds that visit every table. */
async function timeAlternating(
  tables: readonly SizedTable[],
  blocks: number,
): Promise<GrowthPoint[]> {
  const operations = tables.map((table) => statementsOf(table));
  const latencies = tables.map(() => ({
    claim_new: [] as number[],
    claim_existing: [] as number[],
    select_by_pk: [] as number[],
  }));
  for (const ops of operations) for (const name of OPERATIONS) await repeat(ops[name], WARMUP_OPS);
  for (let block = 0; block < blocks; block++) {
    for (const [index, ops] of operations.entries()) {
      for (const name of OPERATIONS)
        latencies[index][name].push(...(await repeat(ops[name], OPS / blocks)));
    }
  }
  return tables.map((table, index) => ({
    rows: table.size,
    insert_s: table.insert_s,
    claim_new: summarize(latencies[index].claim_new),
    claim_existing: summarize(latencies[index].claim_existing),
    select_by_pk: summarize(latencies[index].select_by_pk),
  }));
}

const OPERATIONS = ['claim_new', 'claim_existing', 'select_by_pk'] as const;

function statementsOf({
  dataSource,
  store,
  table,
  size,
}: SizedTable): Record<(typeof OPERATIONS)[number], () => Promise<unknown>> {
  const stamp = Date.now();
  let sequence = 0;
  // Random existing keys: a cycle over a few hot keys would stay in cache and hide growth.
  const existingKey = () => `g-${Math.floor(Math.random() * size)}`;
  const selectSql = `SELECT * FROM ${table} WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3`;
  return {
    claim_new: () =>
      store.claim(
        claimOf(
          `new-${size}-${stamp}-${sequence++}`,
          randomUUID().replace(/-/g, '').padEnd(64, '0'),
        ),
      ),
    claim_existing: async () => {
      const result = await store.claim(claimOf(existingKey(), SYNTHETIC_FINGERPRINT));
      if (result.claimed || result.record.state !== 'completed')
        throw new Error('growth: a synthetic key did not replay');
    },
    select_by_pk: () => dataSource.query(selectSql, ['', SYNTHETIC_ENDPOINT, existingKey()]),
  };
}

async function repeat(operation: () => Promise<unknown>, times: number): Promise<number[]> {
  const latencies: number[] = [];
  for (let i = 0; i < times; i++) {
    const started = performance.now();
    await operation();
    latencies.push(performance.now() - started);
  }
  return latencies;
}

/**
 * What the purge does with the database to itself: the same batches as `IdempotencyPurgeJob`
 * (store.purgeExpired, default batch size) with no request traffic, to set against the purge
 * under load in results.md.
 */
async function purgeIdle(dataSource: DataSource, store: TypeOrmIdempotencyStore, table: string) {
  await dataSource.query(
    bulkInsertSql(table, 0, IDLE_PURGE_ROWS, Date.now() - 3_600_000, 'expired-'),
  );
  await dataSource.query(`ANALYZE ${table}`);
  const now = Date.now();
  const started = performance.now();
  let rows = 0;
  for (;;) {
    const deleted = await store.purgeExpired(now, DEFAULTS.purgeBatchSize);
    rows += deleted;
    if (deleted < DEFAULTS.purgeBatchSize) break;
  }
  const seconds = (performance.now() - started) / 1000;
  return { rows, seconds: Math.round(seconds * 100) / 100, rows_per_s: Math.round(rows / seconds) };
}

function claimOf(key: string, fingerprint: string) {
  const now = Date.now();
  return {
    id: { scope: '', endpoint: SYNTHETIC_ENDPOINT, key },
    fingerprint,
    token: randomUUID(),
    now,
    lockedUntil: now + 60_000,
  };
}

/**
 * The plans of the statements the store really sends, captured by the logger (the claim's SQL is
 * private to the library and the complete's is generated), each run in a rolled-back transaction.
 */
async function explainStatements(
  dataSource: DataSource,
  store: TypeOrmIdempotencyStore,
  counter: QueryCounter,
  size: number,
) {
  const now = Date.now();
  const existing = await counter.capture(() =>
    store.claim(claimOf(`g-${Math.floor(size / 2)}`, SYNTHETIC_FINGERPRINT)),
  );
  // One real claim + complete of a sample key, then the same statements on a key never used.
  const sample = claimOf(`explain-sample-${now}`, SYNTHETIC_FINGERPRINT);
  const fresh = await counter.capture(() => store.claim(sample));
  if (!fresh.result.claimed) throw new Error('growth: the sample claim did not claim');
  const lease = fresh.result.lease;
  const response = {
    status: 201,
    headers: {},
    body: '{}',
    bodyEncoding: 'json',
    isError: false,
  } as const;
  const completed = await counter.capture(() => store.complete(lease, response, now + 86_400_000));
  const swaps = new Map<unknown, unknown>([
    [sample.id.key, `explain-${now}`],
    [sample.token, randomUUID()],
  ]);
  const claimNew = withParameters(decidingStatement(fresh.statements, 'claim'), swaps);
  return {
    claim_existing: await explainRolledBack(
      dataSource,
      decidingStatement(existing.statements, 'claim'),
    ),
    claim_new: await explainRolledBack(dataSource, claimNew),
    // The complete of a row claimed in the same (rolled-back) transaction.
    complete: await explainRolledBack(
      dataSource,
      withParameters(decidingStatement(completed.statements, 'complete'), swaps),
      claimNew,
    ),
  };
}
