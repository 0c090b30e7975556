import { fileURLToPath } from 'node:url';

/**
 * Settings of `npm run bench`, from environment variables so a longer or shorter run needs no code
 * change. The defaults keep the whole run under ten minutes on a 2-core machine.
 */
export interface BenchConfig {
  /** Seconds per route per round. */
  readonly durationS: number;
  /** Alternating rounds: every target and route once per round, so drift hits all alike. */
  readonly rounds: number;
  readonly connections: number;
  /** Completed keys created before the `replay` route is loaded, then cycled through. */
  readonly replayKeys: number;
  /** `first` requests sent before the app's RSS is read again. */
  readonly memoryRequests: number;
  /** Table sizes for the growth measurement, per database. */
  readonly growthSizes: {
    readonly postgres: readonly number[];
    readonly pglite: readonly number[];
  };
  /** Expired rows the purge deletes while traffic runs. */
  readonly purgeRows: number;
  readonly databaseUrl: string;
  readonly redisUrl: string;
  /**
   * PostgreSQL schema of the bench's tables (`BENCH_SCHEMA`, default `bench`): never the test
   * suite's `public.idempotency_records`.
   */
  readonly schema: string;
  readonly soak: boolean;
  /**
   * Seconds the whole default run may take: the memory phase's top-up load stops early (and says
   * so) when it would push the run past this, keeping `reserveS` for the growth phase after it.
   */
  readonly budgetS: number;
  readonly growthReserveS: number;
}

const soak = process.env.BENCH_SOAK === '1';

function numberFromEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0)
    throw new TypeError(`${name} must be a positive number; got ${raw}`);
  return value;
}

export const BENCH_CONFIG: BenchConfig = {
  durationS: numberFromEnv('BENCH_DURATION', soak ? 15 : 5),
  rounds: numberFromEnv('BENCH_ROUNDS', soak ? 5 : 3),
  connections: numberFromEnv('BENCH_CONNECTIONS', 20),
  replayKeys: numberFromEnv('BENCH_REPLAY_KEYS', 1000),
  memoryRequests: numberFromEnv('BENCH_MEMORY_REQUESTS', 100_000),
  growthSizes: {
    postgres: process.env.BENCH_GROWTH_SIZES
      ? process.env.BENCH_GROWTH_SIZES.split(',').map(Number)
      : soak
        ? [10_000, 1_000_000, 10_000_000]
        : [10_000, 1_000_000],
    pglite: [10_000, 100_000],
  },
  purgeRows: numberFromEnv('BENCH_PURGE_ROWS', 1_000_000),
  databaseUrl: process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
  redisUrl: process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379',
  schema: process.env.BENCH_SCHEMA ?? 'bench',
  soak,
  budgetS: soak ? Number.POSITIVE_INFINITY : numberFromEnv('BENCH_BUDGET_S', 540),
  growthReserveS: 100,
};

/** The repository root (this file runs from dist/bench/). */
export const PROJECT_ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** The peer app's sources stay in bench/peer (plain CommonJS, not compiled by tsc). */
export const PEER_DIR = fileURLToPath(new URL('../../bench/peer/', import.meta.url));

/** The request every route gets: the same body, so `replay` matches the stored fingerprint. */
export const ORDER_BODY = JSON.stringify({ amount: 1250, currency: 'eur', customer: 'cus_bench' });

/** Route paths of both apps (ours and the peer): one handler, mounted with and without idempotency. */
export const ROUTES = {
  plain: '/orders/plain',
  /** Ours only: the handler behind an interceptor that does nothing (bench:quick). */
  passThrough: '/orders/pass-through',
  idempotent: '/orders',
  /** Ours only: the realistic handler (one INSERT) without, with, and transactional. */
  write: '/payments/plain',
  writeIdempotent: '/payments',
  writeTransactional: '/payments/tx',
} as const;
