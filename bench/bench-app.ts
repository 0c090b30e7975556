import 'reflect-metadata';
import { Body, Controller, Module, Post, type INestApplication } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { DataSource, type DataSourceOptions } from 'typeorm';
import { PGliteDriver } from 'typeorm-pglite';
import { Idempotent, IdempotencyModule, IdempotencyPurgeJob, IdempotencyRecord } from '../lib/index.js';
import { QueryCounter } from './query-counter.js';

export type BenchDatabase = 'postgres' | 'pglite';

/** pg's and TypeORM's default pool size, stated so the bench does not depend on the default. */
const POOL_SIZE = 10;

interface OrderRequest {
  amount: number;
  currency: string;
  customer: string;
}

/**
 * The handler under test: cheap on purpose, so the routes measure the idempotency layer rather
 * than business logic. bench/peer/peer-app.cjs has the same function for the peer library.
 */
function acceptOrder(body: OrderRequest) {
  return { id: randomUUID(), amount: body.amount, currency: body.currency, customer: body.customer, status: 'accepted' };
}

/** One handler twice: `plain` is the ceiling, `/orders` is the same work behind `@Idempotent()`. */
@Controller('orders')
class OrdersController {
  @Post('plain')
  plain(@Body() body: OrderRequest) {
    return acceptOrder(body);
  }

  @Post()
  @Idempotent()
  create(@Body() body: OrderRequest) {
    return acceptOrder(body);
  }
}

export interface BenchApp {
  readonly app: INestApplication;
  readonly port: number;
  readonly counter: QueryCounter;
  readonly purgeJob: IdempotencyPurgeJob;
  /** The pg pool's counters (PostgreSQL): requests queue here when every connection is busy. */
  pool(): { total: number; idle: number; waiting: number } | null;
  close(): Promise<void>;
}

export interface BenchAppOptions {
  readonly database: BenchDatabase;
  readonly databaseUrl: string;
  /** PostgreSQL schema of the records table; it must exist (the runner creates it). */
  readonly schema: string;
}

/**
 * Boots the app on an ephemeral port of 127.0.0.1. The DataSource is the app's own, handed to the
 * module, so the bench can attach its query-counting logger. The purge timer is off: the bench runs
 * `purgeNow()` when it measures the purge, and a timer firing mid-round would skew a route.
 */
export async function startBenchApp(options: BenchAppOptions): Promise<BenchApp> {
  const counter = new QueryCounter();
  // idleTimeoutMillis 0: the pool keeps its connections between rounds. The server is shared with
  // the test suite, which can fill max_connections; a pool that had to reconnect then fails.
  const base: DataSourceOptions =
    options.database === 'postgres'
      ? { type: 'postgres', url: options.databaseUrl, schema: options.schema, extra: { max: POOL_SIZE, idleTimeoutMillis: 0 } }
      : { type: 'postgres', driver: new PGliteDriver().driver };
  if (options.database === 'postgres') counter.patchPgClient();
  const dataSource = new DataSource({ ...base, entities: [IdempotencyRecord], logger: counter });
  await dataSource.initialize();
  if (options.database === 'postgres') {
    // Open every pooled connection now, while the server has slots, rather than mid-round.
    await Promise.all(Array.from({ length: POOL_SIZE }, () => dataSource.query('SELECT pg_sleep(0.05)')));
  }

  @Module({
    imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false })],
    controllers: [OrdersController],
  })
  class BenchModule {}

  const app = await NestFactory.create(BenchModule, { logger: ['error', 'warn'], abortOnError: false });
  await app.listen(0, '127.0.0.1');
  const { port } = app.getHttpServer().address() as AddressInfo;
  return {
    app,
    port,
    counter,
    purgeJob: app.get(IdempotencyPurgeJob),
    pool() {
      const pool = (dataSource.driver as unknown as { master?: { totalCount: number; idleCount: number; waitingCount: number } }).master;
      return pool && typeof pool.waitingCount === 'number'
        ? { total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }
        : null;
    },
    async close() {
      await app.close();
      if (dataSource.isInitialized) await dataSource.destroy();
    },
  };
}
