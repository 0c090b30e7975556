/**
 * How long a duplicate in `concurrency: 'wait'` mode waits beyond the first request's completion,
 * on PostgreSQL, with LISTEN/NOTIFY wake-ups and with polling at the default `waitPollInterval`.
 * Self-contained: `measureWaiterDelay(url)` creates the schema `bench_waiter`, runs, drops it.
 * Alone: `node dist/bench/waiter-delay.js [postgres-url]` (default BENCH_DATABASE_URL or
 * DATABASE_URL) prints the figures as JSON.
 *
 * Per mode, two app contexts with a connection pool each — one runs the first requests, the other
 * the waiters, as two processes behind a load balancer would — drive `IdempotencyService` directly
 * (no HTTP, so only the wait is measured). Per key: the first request claims the key; a duplicate
 * starts waiting (its first read found the key in progress); after a random 0–100 ms "handler run"
 * the first completes. The delay is from the moment the completion's write returned (committed, and
 * so notified) to the moment the waiter's decision (the replay) returned, on one clock.
 */
import 'reflect-metadata';
import { Module, type INestApplicationContext } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { DataSource } from 'typeorm';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import {
  IdempotencyRecord,
  IdempotencyModule,
  IdempotencyService,
  TypeOrmIdempotencyStore,
  type ClaimRequest,
  type ClaimResult,
  type IdempotencyStore,
  type Lease,
  type RecordId,
  type StoredResponse,
} from '../lib/index.js';

export interface WaiterDelayOptions {
  /** Keys measured per mode (after WARMUP_KEYS unmeasured ones). @default 200 */
  readonly keys?: number;
  /** The first request's "handler" runs for a random time below this. @default 100 */
  readonly maxRunMs?: number;
}

/** One mode's figures, in milliseconds. */
export interface WaiterDelayFigures {
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly maxMs: number;
  readonly meanMs: number;
  /** Reads of the record by each waiter (claims answered "in progress" and the final one), mean. */
  readonly readsPerWaiter: number;
}

export interface WaiterDelayResult {
  readonly keys: number;
  /** `waitPollInterval` of both modes: the default. */
  readonly waitPollIntervalMs: number;
  readonly maxRunMs: number;
  readonly notifications: WaiterDelayFigures;
  readonly polling: WaiterDelayFigures;
}

const SCHEMA = 'bench_waiter';
const WARMUP_KEYS = 10;
const DEFAULT_WAIT_POLL_INTERVAL_MS = 50;
const ENDPOINT = 'POST /bench/waiter-delay';
const RESPONSE: StoredResponse = {
  status: 201,
  headers: { 'content-type': 'application/json' },
  body: '{"ok":true}',
  bodyEncoding: 'json',
  isError: false,
};

export async function measureWaiterDelay(
  databaseUrl: string,
  options: WaiterDelayOptions = {},
): Promise<WaiterDelayResult> {
  const keys = options.keys ?? 200;
  const maxRunMs = options.maxRunMs ?? 100;
  const admin = new DataSource({ type: 'postgres', url: databaseUrl });
  await admin.initialize();
  try {
    await admin.query(`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE`);
    await admin.query(`CREATE SCHEMA ${SCHEMA}`);
    // One mode after the other, so they never share the server's attention.
    const notifications = await measureMode(databaseUrl, true, keys, maxRunMs);
    const polling = await measureMode(databaseUrl, false, keys, maxRunMs);
    return {
      keys,
      waitPollIntervalMs: DEFAULT_WAIT_POLL_INTERVAL_MS,
      maxRunMs,
      notifications,
      polling,
    };
  } finally {
    await admin.query(`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE`);
    await admin.destroy();
  }
}

async function measureMode(
  databaseUrl: string,
  waitNotifications: boolean,
  keys: number,
  maxRunMs: number,
): Promise<WaiterDelayFigures> {
  const first = await startContext(databaseUrl, waitNotifications);
  const waiter = await startContext(databaseUrl, waitNotifications);
  try {
    const delays: number[] = [];
    const reads: number[] = [];
    for (let index = 0; index < WARMUP_KEYS + keys; index++) {
      const sample = await measureKey(first, waiter, maxRunMs);
      if (index < WARMUP_KEYS) continue;
      delays.push(sample.delayMs);
      reads.push(sample.reads);
    }
    return summarise(delays, reads);
  } finally {
    await Promise.all([first.close(), waiter.close()]);
  }
}

async function measureKey(first: BenchContext, waiter: BenchContext, maxRunMs: number) {
  const id: RecordId = { scope: '', endpoint: ENDPOINT, key: randomUUID() };
  const request = {
    id,
    fingerprint: 'f'.repeat(64),
    lockTimeoutMs: 60_000,
    concurrency: 'wait' as const,
    waitTimeoutMs: 30_000,
  };
  const claimed = await first.service.begin(request);
  if (claimed.action !== 'execute') throw new Error(`the first request got ${claimed.action}`);

  const waiting = waiter.store.untilWaiting(id.key);
  let answeredAt = 0;
  const decision = waiter.service.begin(request).then((result) => {
    answeredAt = performance.now();
    return result;
  });
  await waiting;
  await sleep(Math.random() * maxRunMs);
  await first.service.complete(claimed.lease, RESPONSE, 60_000);
  const completedAt = performance.now();
  const result = await decision;
  if (result.action !== 'replay') throw new Error(`the waiter got ${result.action}`);
  return { delayMs: answeredAt - completedAt, reads: waiter.store.readsOf(id.key) };
}

interface BenchContext {
  readonly service: IdempotencyService;
  readonly store: ObservedStore;
  close(): Promise<void>;
}

/** An app context (the module, no HTTP) with a pool of its own on the bench schema. */
async function startContext(
  databaseUrl: string,
  waitNotifications: boolean,
): Promise<BenchContext> {
  const dataSource = new DataSource({
    type: 'postgres',
    url: databaseUrl,
    schema: SCHEMA,
    entities: [IdempotencyRecord],
    extra: { max: 4 },
  });
  await dataSource.initialize();
  const store = new ObservedStore(new TypeOrmIdempotencyStore(dataSource, { waitNotifications }));
  @Module({
    imports: [
      IdempotencyModule.forRoot({ dataSource, store, purgeInterval: false, runMigrations: false }),
    ],
  })
  class WaiterDelayModule {}
  await ensureTable(dataSource);
  const app: INestApplicationContext = await NestFactory.createApplicationContext(
    WaiterDelayModule,
    {
      logger: ['error', 'warn'],
    },
  );
  return {
    service: app.get(IdempotencyService),
    store,
    async close() {
      await app.close();
      await store.inner.close();
      await dataSource.destroy();
    },
  };
}

/** The records table in the bench schema (the module's migrations; safe from both processes). */
async function ensureTable(dataSource: DataSource) {
  await ensureIdempotencyTable(dataSource);
}

/**
 * The real TypeORM store, observed: counts each key's reads (claims that did not claim) and tells
 * when the first of them has returned — from then on the waiter waits.
 */
class ObservedStore implements IdempotencyStore {
  private readonly reads = new Map<string, number>();
  private readonly waiting = new Map<string, () => void>();

  constructor(readonly inner: TypeOrmIdempotencyStore) {}

  untilWaiting(key: string): Promise<void> {
    return new Promise((resolve) => this.waiting.set(key, resolve));
  }

  readsOf(key: string): number {
    const reads = this.reads.get(key) ?? 0;
    this.reads.delete(key);
    return reads;
  }

  async claim(request: ClaimRequest): Promise<ClaimResult> {
    const result = await this.inner.claim(request);
    if (!result.claimed) {
      const { key } = request.id;
      this.reads.set(key, (this.reads.get(key) ?? 0) + 1);
      this.waiting.get(key)?.();
      this.waiting.delete(key);
    }
    return result;
  }

  complete(lease: Lease, response: StoredResponse, expiresAt: number) {
    return this.inner.complete(lease, response, expiresAt);
  }

  release(lease: Lease) {
    return this.inner.release(lease);
  }

  renew(lease: Lease, lockedUntil: number) {
    return this.inner.renew(lease, lockedUntil);
  }

  purgeExpired(now: number, limit: number) {
    return this.inner.purgeExpired(now, limit);
  }

  watch(id: RecordId) {
    return this.inner.watch(id);
  }
}

function summarise(delays: number[], reads: number[]): WaiterDelayFigures {
  const sorted = [...delays].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  const round = (value: number) => Math.round(value * 100) / 100;
  const mean = (values: number[]) => values.reduce((sum, value) => sum + value, 0) / values.length;
  return {
    p50Ms: round(at(0.5)),
    p99Ms: round(at(0.99)),
    maxMs: round(sorted[sorted.length - 1]),
    meanMs: round(mean(delays)),
    readsPerWaiter: round(mean(reads)),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const url = process.argv[2] ?? process.env.BENCH_DATABASE_URL ?? process.env.DATABASE_URL;
  if (!url)
    throw new Error('usage: waiter-delay.js <postgres-url> (or BENCH_DATABASE_URL / DATABASE_URL)');
  console.log(JSON.stringify(await measureWaiterDelay(url), null, 2));
}
