/**
 * Review of the "lean request path" (the response's status and headers noted just before the
 * handler runs, `HttpTransport.prepare`, rather than when the interceptor starts): what happens to
 * the response between those two moments — a waiting duplicate's wait, the claim's round trip.
 */
import {
  Controller,
  Headers,
  Injectable,
  Module,
  Post,
  type INestApplication,
  type MiddlewareConsumer,
  type NestMiddleware,
} from '@nestjs/common';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  Idempotent,
  IdempotencyAdmin,
  IdempotencyModule,
  IdempotencyRecord,
  IdempotencyStore,
} from '../lib/index.js';
import { createFixtureApp, recordsOf } from './fixtures/fixture-app.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases } from './support/databases.js';
import { newKey, post } from './support/http.js';
import { waitFor } from './support/reliability.js';

const KEY = 'idempotency-key';

/** Handler runs, by key. */
const runs = new Map<string, number>();
/** The first run of each key is held until the test opens it, then crashes (the key is released). */
const gates = new Map<string, () => void>();

@Controller('transfers')
class TransfersController {
  @Post()
  @Idempotent({ concurrency: 'wait', waitTimeout: '20s' })
  async create(@Headers(KEY) key: string) {
    const run = (runs.get(key) ?? 0) + 1;
    runs.set(key, run);
    if (run === 1) {
      await new Promise<void>((resolve) => gates.set(key, resolve));
      throw new Error('the first attempt crashed');
    }
    return { id: randomUUID(), run };
  }
}

/**
 * A request timeout as `connect-timeout` gives one: a request still unanswered after
 * `x-answer-within` ms is answered 503 by the middleware's timer, while the app goes on with it.
 */
@Injectable()
class RequestTimeoutMiddleware implements NestMiddleware {
  use(
    request: { headers: Record<string, string | undefined> },
    response: {
      headersSent: boolean;
      statusCode: number;
      setHeader(n: string, v: string): void;
      end(body: string): void;
    },
    next: () => void,
  ) {
    const within = Number(request.headers['x-answer-within']);
    if (within > 0) {
      setTimeout(() => {
        if (response.headersSent) return;
        response.statusCode = 503;
        response.setHeader('Content-Type', 'application/json');
        response.end(JSON.stringify({ code: 'request_timeout' }));
      }, within).unref();
    }
    next();
  }
}

const postgres = testDatabases.find((database) => database.name === 'postgres');
const describeOnPostgres = postgres ? describe : describe.skip;

describeOnPostgres('review: the lean request path, on PostgreSQL', () => {
  let dataSource: DataSource;
  beforeAll(async () => {
    dataSource = new DataSource({ ...postgres!.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
  });
  afterAll(() => dataSource.destroy());

  async function boot(platform: 'express' | 'fastify'): Promise<INestApplication> {
    @Module({
      imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false })],
      controllers: [TransfersController],
    })
    class AppModule {
      configure(consumer: MiddlewareConsumer) {
        consumer.apply(RequestTimeoutMiddleware).forRoutes(TransfersController);
      }
    }
    const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
    const app =
      platform === 'fastify'
        ? moduleRef.createNestApplication(new FastifyAdapter(), { logger: false })
        : moduleRef.createNestApplication({ logger: false });
    await app.listen(0, '127.0.0.1');
    return app;
  }

  it.each(['express', 'fastify'] as const)(
    '%s: a waiting duplicate answered by a request timeout during its wait, that then takes the key over and runs: its result is stored with the route’s status, and the retry replays it',
    async (platform) => {
      const app = await boot(platform);
      try {
        const http = app.getHttpServer();
        const key = newKey();
        // The first attempt holds the key.
        const first = post(http, '/transfers', key).then((response) => response);
        const open = await waitFor('the first attempt to run', () => gates.get(key));
        // A duplicate waits for it, and is answered 503 by the timeout while it waits.
        const duplicate = await post(http, '/transfers', key).set('x-answer-within', '200');
        expect(duplicate.status).toBe(503);
        expect(runs.get(key)).toBe(1);
        // The first attempt crashes: the duplicate, still waiting in the app, takes the key over and
        // runs the handler to its end.
        open();
        expect((await first).status).toBe(500);
        await waitFor('the duplicate to run', () => (runs.get(key) === 2 ? true : undefined));
        await waitFor('the duplicate’s key to be settled', async () => {
          const [record] = await recordsOf(dataSource, key);
          return record?.state === 'in_progress' ? undefined : (record ?? null);
        });
        // The client retries after its 503: the handler ran, so it gets that run's result, as a
        // duplicate answered by a timeout while its handler ran does (review-http.spec.ts).
        const retry = await post(http, '/transfers', key);
        expect({ status: retry.status, replayed: retry.headers['idempotent-replayed'] }).toEqual({
          status: 201,
          replayed: 'true',
        });
        expect(retry.body).toEqual({ id: expect.any(String), run: 2 });
        expect(runs.get(key)).toBe(2);
      } finally {
        await app.close();
      }
    },
  );
});

/**
 * The replay cache and an operator's `forget` (docs/operations.md "Replay caches": "The record is
 * dropped at once from the acting process's cache"). Not of the lean path itself: a request that
 * read the completed record just before the forget caches it just after, and the cache keeps it.
 */
describeOnPostgres('review: the replay cache and a forget racing a read, on PostgreSQL', () => {
  it('a record forgotten while a request was reading it is not replayed from the cache afterwards', async () => {
    const log = new CapturedLog();
    const fixture = await createFixtureApp(postgres!, {}, 'express', { logger: log });
    try {
      const store = fixture.app.get<IdempotencyStore>(IdempotencyStore);
      const admin = fixture.app.get(IdempotencyAdmin);
      // The process listens for deletions, and has checked what it cached first.
      const warm = newKey();
      await post(fixture.http, '/charges', warm, { amount: 1 }).expect(201);
      await post(fixture.http, '/charges', warm, { amount: 1 }).expect(201);
      await waitFor('the process to listen for deletions', () =>
        log.lines.some((line) => line.text.includes('kept the cached records still stored'))
          ? true
          : undefined,
      );

      const key = newKey();
      await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
      // The next claim of `key` reads the completed record; its answer is held in this process
      // (the event loop busy elsewhere, say) until the operator's forget is done.
      let read: (() => void) | undefined;
      const claim = store.claim.bind(store);
      store.claim = async (request) => {
        const result = await claim(request);
        if (request.id.key === key && !result.claimed)
          await new Promise<void>((resolve) => (read = resolve));
        return result;
      };
      const reading = post(fixture.http, '/charges', key, { amount: 1 }).then((r) => r);
      const release = await waitFor('the record to be read', () => read);
      await admin.forget(key, { actor: 'review' });
      expect(await recordsOf(fixture.dataSource, key)).toEqual([]);
      release();
      // Read before the forget: its replay is the record's.
      expect((await reading).headers['idempotent-replayed']).toBe('true');

      // After the forget, the next request runs the handler.
      const next = await post(fixture.http, '/charges', key, { amount: 1 });
      expect(next.status).toBe(201);
      expect(next.headers['idempotent-replayed']).toBeUndefined();
      expect(fixture.calls.count('charges', key)).toBe(2);
    } finally {
      await fixture.close();
    }
  });
});
