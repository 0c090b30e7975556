import 'reflect-metadata';
import {
  Body,
  Controller,
  Module,
  Post,
  UseInterceptors,
  type CallHandler,
  type INestApplication,
  type NestInterceptor,
} from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Redis } from 'ioredis';
import { DataSource, type DataSourceOptions } from 'typeorm';
import {
  Idempotent,
  IdempotencyContext,
  IdempotencyModule,
  IdempotencyPurgeJob,
  IdempotencyRecord,
  pgliteDriver,
  RedisIdempotencyStore,
  type IdempotencyStore,
} from '../lib/index.js';
import { QueryCounter } from './query-counter.js';

/** Where our records live: PostgreSQL, PGlite, or Redis (the RedisIdempotencyStore). */
export type BenchDatabase = 'postgres' | 'pglite' | 'redis';

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
  return {
    id: randomUUID(),
    amount: body.amount,
    currency: body.currency,
    customer: body.customer,
    status: 'accepted',
  };
}

/**
 * Requests of the `hold` routes in flight, each waiting for `releaseHeld()`: memory per in-flight
 * request, and per running lease (in-flight/`hold` behind `@Idempotent()`), with the handler
 * parked.
 */
const held: (() => void)[] = [];

/** Lets every held request finish; returns how many there were. */
export function releaseHeld(): number {
  const count = held.length;
  for (const release of held.splice(0)) release();
  return count;
}

/** How many requests the `hold` routes hold right now. */
export function heldCount(): number {
  return held.length;
}

/** The order handler, parked until `releaseHeld()`: with and without `@Idempotent()`. */
@Controller('hold')
class HoldController {
  @Post('plain')
  async plain(@Body() body: OrderRequest) {
    await new Promise<void>((resolve) => held.push(resolve));
    return acceptOrder(body);
  }

  @Post()
  @Idempotent()
  async create(@Body() body: OrderRequest) {
    await new Promise<void>((resolve) => held.push(resolve));
    return acceptOrder(body);
  }
}

/** An interceptor that does nothing: what Nest's interceptor pipeline alone costs a route. */
class PassThroughInterceptor implements NestInterceptor {
  intercept(_context: unknown, next: CallHandler) {
    return next.handle();
  }
}

/**
 * One handler three times: `plain` is the ceiling, `/orders` is the same work behind
 * `@Idempotent()`, and `pass-through` behind an interceptor that does nothing (the floor of any
 * library that is an interceptor, `npm run bench:quick -- plain,pass_through`).
 */
@Controller('orders')
class OrdersController {
  @Post('plain')
  plain(@Body() body: OrderRequest) {
    return acceptOrder(body);
  }

  @Post('pass-through')
  @UseInterceptors(PassThroughInterceptor)
  passThrough(@Body() body: OrderRequest) {
    return acceptOrder(body);
  }

  @Post()
  @Idempotent()
  create(@Body() body: OrderRequest) {
    return acceptOrder(body);
  }
}

/** The realistic handler's table: one row per payment, in the bench's schema. */
let paymentsTable = 'bench_payments';

/** The realistic handler: one INSERT of a payment row, through `query` (the pool, or a transaction). */
async function insertPayment(
  body: OrderRequest,
  query: (sql: string, values: unknown[]) => Promise<unknown>,
) {
  const payment = acceptOrder(body);
  await query(
    `INSERT INTO ${paymentsTable} (id, amount, currency, customer) VALUES ($1, $2, $3, $4)`,
    [payment.id, payment.amount, payment.currency, payment.customer],
  );
  return payment;
}

/**
 * The realistic handler three ways: `plain` without the library, `/payments` behind `@Idempotent()`
 * (its INSERT commits on its own, then the response is stored), `/payments/tx` in the transactional
 * mode (the INSERT and the stored response commit together).
 */
@Controller('payments')
class PaymentsController {
  constructor(
    private readonly dataSource: DataSource,
    private readonly idempotency: IdempotencyContext,
  ) {}

  @Post('plain')
  plain(@Body() body: OrderRequest) {
    return insertPayment(body, (sql, values) => this.dataSource.query(sql, values));
  }

  @Post()
  @Idempotent()
  create(@Body() body: OrderRequest) {
    return insertPayment(body, (sql, values) => this.dataSource.query(sql, values));
  }

  @Post('tx')
  @Idempotent({ transactional: true })
  createInTransaction(@Body() body: OrderRequest) {
    return insertPayment(body, (sql, values) => this.idempotency.entityManager.query(sql, values));
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
  readonly redisUrl: string;
}

/** The bench's Redis keys, deleted when the app closes. */
const REDIS_PREFIX = `bench-ours-${process.pid}:`;

/** Each store call is one Redis command (a script): counted as one statement, for the queries table. */
function countedRedisStore(store: RedisIdempotencyStore, counter: QueryCounter): IdempotencyStore {
  const counted =
    <A extends unknown[], R>(name: string, call: (...args: A) => Promise<R>) =>
    (...args: A) => {
      counter.logQuery(`EVALSHA ${name}`);
      return call(...args);
    };
  return {
    claim: counted('claim', (request) => store.claim(request)),
    complete: counted('complete', (lease, response, expiresAt) =>
      store.complete(lease, response, expiresAt),
    ),
    release: counted('release', (lease) => store.release(lease)),
    renew: counted('renew', (lease, lockedUntil) => store.renew(lease, lockedUntil)),
    purgeExpired: () => store.purgeExpired(),
    watch: (id) => store.watch(id),
  };
}

async function deleteRedisKeys(redis: Redis): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${REDIS_PREFIX}*`, 'COUNT', 1000);
    if (keys.length > 0) await redis.unlink(...keys);
    cursor = next;
  } while (cursor !== '0');
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
  const redis =
    options.database === 'redis'
      ? new Redis(options.redisUrl, { enableOfflineQueue: false })
      : null;
  const redisStore = redis ? new RedisIdempotencyStore(redis, { prefix: REDIS_PREFIX }) : null;
  const base: DataSourceOptions =
    options.database === 'postgres'
      ? {
          type: 'postgres',
          url: options.databaseUrl,
          schema: options.schema,
          extra: { max: POOL_SIZE, idleTimeoutMillis: 0 },
        }
      : { type: 'postgres', driver: pgliteDriver() };
  if (options.database === 'postgres') counter.patchPgClient();
  const dataSource = new DataSource({ ...base, entities: [IdempotencyRecord], logger: counter });
  await dataSource.initialize();
  if (options.database === 'postgres') {
    // Open every pooled connection now, while the server has slots, rather than mid-round.
    await Promise.all(
      Array.from({ length: POOL_SIZE }, () => dataSource.query('SELECT pg_sleep(0.05)')),
    );
  }

  paymentsTable =
    options.database === 'postgres' ? `${options.schema}.bench_payments` : 'bench_payments';
  await dataSource.query(
    `CREATE TABLE IF NOT EXISTS ${paymentsTable} (id uuid PRIMARY KEY, amount int NOT NULL, currency text NOT NULL, customer text NOT NULL)`,
  );

  const store = redisStore ? countedRedisStore(redisStore, counter) : undefined;
  @Module({
    imports: [IdempotencyModule.forRoot({ dataSource, store, purgeInterval: false })],
    // On Redis only the orders: the realistic handler's transactional route needs a SQL store.
    controllers: redisStore
      ? [OrdersController, HoldController]
      : [OrdersController, PaymentsController, HoldController],
    providers: [{ provide: DataSource, useValue: dataSource }],
  })
  class BenchModule {}

  const app = await NestFactory.create<INestApplication<Server>>(BenchModule, {
    logger: ['error', 'warn'],
    abortOnError: false,
  });
  await app.listen(0, '127.0.0.1');
  const { port } = app.getHttpServer().address() as AddressInfo;
  return {
    app,
    port,
    counter,
    purgeJob: app.get(IdempotencyPurgeJob),
    pool() {
      const pool = (
        dataSource.driver as unknown as {
          master?: { totalCount: number; idleCount: number; waitingCount: number };
        }
      ).master;
      return pool && typeof pool.waitingCount === 'number'
        ? { total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }
        : null;
    },
    async close() {
      await app.close();
      if (dataSource.isInitialized) await dataSource.destroy();
      if (redis) {
        await redisStore!.close();
        await deleteRedisKeys(redis);
        redis.disconnect();
      }
    },
  };
}
