import {
  Catch,
  Controller,
  Get,
  Head,
  Headers,
  HttpException,
  Injectable,
  Module,
  Param,
  Post,
  Redirect,
  Req,
  Res,
  UseFilters,
  type ArgumentsHost,
  type ExceptionFilter,
  type INestApplication,
  type MiddlewareConsumer,
  type NestMiddleware,
  RequestTimeoutException,
  UseInterceptors,
  type CallHandler,
  type ExecutionContext,
  type NestInterceptor,
  type Type,
} from '@nestjs/common';
import { catchError, throwError, timeout, TimeoutError, type Observable } from 'rxjs';
import { APP_FILTER } from '@nestjs/core';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test } from '@nestjs/testing';
import { createHash, randomUUID } from 'node:crypto';
import net, { type AddressInfo } from 'node:net';
import request from 'supertest';
import { DataSource } from 'typeorm';
import { Idempotent, IdempotencyModule, IdempotencyRecord } from '../lib/index.js';
import { eachTarget, type HttpPlatform, type TestDatabase } from './support/databases.js';
import { recordsOf } from './fixtures/fixture-app.js';
import { expectProblem, newKey, post } from './support/http.js';
import { waitFor } from './support/reliability.js';

const KEY = 'idempotency-key';

/** Handler runs, per route and key. */
const runs = new Map<string, number>();
const ran = (route: string, key: string) =>
  void runs.set(`${route} ${key}`, (runs.get(`${route} ${key}`) ?? 0) + 1);
const runsOf = (route: string, key: string) => runs.get(`${route} ${key}`) ?? 0;

class InsufficientFundsException extends HttpException {
  constructor(
    readonly balance: number,
    readonly at: Date,
  ) {
    super({ code: 'insufficient_funds' }, 402);
  }
}

@Catch(InsufficientFundsException)
class FundsFilter implements ExceptionFilter {
  catch(exception: InsufficientFundsException, host: ArgumentsHost) {
    const adapter = host.switchToHttp();
    reply(adapter.getResponse(), 402, { shapedBy: 'FundsFilter', balance: exception.balance });
  }
}

/** A filter that reads a Date field as a Date. */
@Catch(InsufficientFundsException)
class DatedFundsFilter implements ExceptionFilter {
  catch(exception: InsufficientFundsException, host: ArgumentsHost) {
    reply(host.switchToHttp().getResponse(), 402, { at: exception.at.toISOString() });
  }
}

function reply(response: any, status: number, body: unknown) {
  if (typeof response.code === 'function' && typeof response.send === 'function' && !response.json)
    response.code(status).send(body);
  else response.status(status).json(body);
}

/** An error that carries what it refused: a field far larger than its body. */
class BatchRefusedException extends HttpException {
  constructor(readonly lines: readonly string[]) {
    super({ code: 'batch_refused', count: lines.length }, 409);
  }
}

/** Two classes of one name, as two modules of an app may each define one. */
function namesake(message: string) {
  class NotAllowedException extends HttpException {
    constructor() {
      super(message, 409);
    }
  }
  return NotAllowedException;
}
const OrdersNotAllowedException = namesake('orders: not allowed');
const PaymentsNotAllowedException = namesake('payments: not allowed');

/** The app's filter (APP_FILTER) for the orders module's class only. */
@Catch(OrdersNotAllowedException)
class OrdersNotAllowedFilter implements ExceptionFilter {
  catch(_exception: unknown, host: ArgumentsHost) {
    reply(host.switchToHttp().getResponse(), 409, { shapedBy: 'OrdersNotAllowedFilter' });
  }
}

/** A base controller whose handler the subclasses share; each has its own filters. */
abstract class PaymentsBase {
  @Post()
  @Idempotent()
  pay(@Headers(KEY) key: string) {
    ran(this.constructor.name, key);
    throw new InsufficientFundsException(5, new Date('2026-01-02T03:04:05.000Z'));
  }
}

@Controller('filtered-payments')
@UseFilters(FundsFilter)
class FilteredPaymentsController extends PaymentsBase {}

@Controller('plain-payments')
class PlainPaymentsController extends PaymentsBase {}

@Controller('dated-payments')
@UseFilters(DatedFundsFilter)
class DatedPaymentsController extends PaymentsBase {}

@Controller('docs')
@Idempotent()
class DocsController {
  @Head(':id')
  head(@Headers(KEY) key: string, @Res({ passthrough: true }) response: any) {
    ran('head', key);
    setHeader(response, 'X-Exists', 'yes');
  }

  @Get(':id')
  get(@Param('id') id: string, @Headers(KEY) key: string) {
    ran('get', key);
    return { id, content: 'the whole document' };
  }

  @Post('cached')
  cached(@Headers(KEY) key: string, @Res({ passthrough: true }) response: any) {
    ran('cached', key);
    setHeader(response, 'Cache-Control', 'private, max-age=60');
    return { id: randomUUID() };
  }

  @Post('batch')
  batch(@Headers(KEY) key: string) {
    ran('batch', key);
    throw new BatchRefusedException(Array.from({ length: 1000 }, (_, i) => `line ${i} `.repeat(8)));
  }

  /** Throws the payments module's class, which no filter catches. */
  @Post('refused')
  refused(@Headers(KEY) key: string) {
    ran('refused', key);
    throw new PaymentsNotAllowedException();
  }

  @Post('redirect')
  @Redirect('https://example.com/default', 303)
  redirect(@Headers(KEY) key: string) {
    ran('redirect', key);
    return { url: `https://example.com/orders/${randomUUID()}` };
  }

  /** Reads the body itself (`application/octet-stream`: no parser reads it before). */
  @Post('raw')
  async raw(@Headers(KEY) key: string, @Req() request: any) {
    const hash = createHash('sha256');
    let bytes = 0;
    for await (const chunk of (request.raw ?? request) as AsyncIterable<Buffer>) {
      hash.update(chunk);
      bytes += chunk.length;
    }
    ran('raw', key);
    return { id: randomUUID(), bytes, sha256: hash.digest('hex') };
  }
}

function setHeader(response: any, name: string, value: string): void {
  if (typeof response.header === 'function' && !response.setHeader) response.header(name, value);
  else response.setHeader(name, value);
}

/** Requests that reached the app, by key: a test waits for its request to be in. */
const arrivals = new Map<string, (request: NodeJS.ReadableStream) => void>();
const arrival = (key: string) =>
  new Promise<NodeJS.ReadableStream>((resolve) => arrivals.set(key, resolve));

/** Sets `Cache-Control: no-store` on every response, as API middleware does. */
@Injectable()
class NoStoreMiddleware implements NestMiddleware {
  use(
    request: NodeJS.ReadableStream & { headers: Record<string, string> },
    response: { setHeader(n: string, v: string): void },
    next: () => void,
  ) {
    response.setHeader('Cache-Control', 'no-store');
    arrivals.get(request.headers[KEY])?.(request);
    next();
  }
}

/** Handlers held until the test opens them, by key. */
const gates = new Map<string, () => void>();
const held = (key: string) => new Promise<void>((resolve) => gates.set(key, resolve));

/** Nest's documented timeout interceptor: a handler slower than 50 ms answers 408. */
@Injectable()
class TimeoutInterceptor implements NestInterceptor {
  intercept(_context: ExecutionContext, next: CallHandler): Observable<unknown> {
    return next.handle().pipe(
      timeout(50),
      catchError((error: unknown) =>
        throwError(() => (error instanceof TimeoutError ? new RequestTimeoutException() : error)),
      ),
    );
  }
}

/** The timeout interceptor on the controller: it runs around the method's @Idempotent(). */
@Controller('slow')
@UseInterceptors(TimeoutInterceptor)
class SlowController {
  @Post()
  @Idempotent()
  async create(@Headers(KEY) key: string) {
    await held(key);
    ran('slow', key);
    return { id: randomUUID() };
  }
}

interface App {
  readonly app: INestApplication;
  readonly http: any;
  readonly port: number;
  close(): Promise<void>;
}

const controllers: Type[] = [
  FilteredPaymentsController,
  PlainPaymentsController,
  DatedPaymentsController,
  DocsController,
  SlowController,
];

async function boot(platform: HttpPlatform, dataSource: DataSource): Promise<App> {
  @Module({
    imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false })],
    controllers,
    providers: [{ provide: APP_FILTER, useClass: OrdersNotAllowedFilter }],
  })
  class AppModule {
    configure(consumer: MiddlewareConsumer) {
      consumer.apply(NoStoreMiddleware).forRoutes(DocsController);
    }
  }
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const app =
    platform === 'fastify'
      ? moduleRef.createNestApplication(new FastifyAdapter(), { logger: false })
      : moduleRef.createNestApplication({ logger: false });
  if (platform === 'fastify') {
    // As a plugin that leaves the body to the handler (@fastify/multipart) registers it.
    app
      .getHttpAdapter()
      .getInstance()
      .addContentTypeParser(
        'application/octet-stream',
        (_request: unknown, _payload: unknown, done: Function) => done(null, undefined),
      );
  }
  await app.listen(0, '127.0.0.1');
  const http = app.getHttpServer();
  return { app, http, port: (http.address() as AddressInfo).port, close: () => app.close() };
}

function sharedDataSource(database: TestDatabase) {
  const shared = { dataSource: undefined as unknown as DataSource };
  beforeAll(async () => {
    shared.dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await shared.dataSource.initialize();
  });
  afterAll(() => shared.dataSource.destroy());
  return shared;
}

describe.each(eachTarget)('review of the HTTP transport on %s', (_name, { database, platform }) => {
  const shared = sharedDataSource(database);

  it('a timeout interceptor around @Idempotent(): the handler finishes once, and the retry gets its result', async () => {
    const app = await boot(platform, shared.dataSource);
    try {
      const key = newKey();
      await post(app.http, '/slow', key).expect(408);
      (await waitFor('the handler to be held', () => gates.get(key)))();
      await waitFor('the record completed', async () =>
        (await recordsOf(shared.dataSource, key))[0]?.state === 'completed' ? true : undefined,
      );
      const retry = await post(app.http, '/slow', key).expect(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual({ id: expect.any(String) });
      expect(runsOf('slow', key)).toBe(1);
    } finally {
      await app.close();
    }
  });

  it("base controller: each subclass's filters shape its replays, after a restart", async () => {
    const filtered = newKey();
    const plain = newKey();
    const first = await boot(platform, shared.dataSource);
    let shaped: unknown;
    try {
      shaped = (await post(first.http, '/filtered-payments', filtered).expect(402)).body;
      expect(shaped).toEqual({ shapedBy: 'FundsFilter', balance: 5 });
      await post(first.http, '/plain-payments', plain).expect(402);
    } finally {
      await first.close();
    }
    const second = await boot(platform, shared.dataSource);
    try {
      const plainReplay = await post(second.http, '/plain-payments', plain).expect(402);
      expect(plainReplay.headers['idempotent-replayed']).toBe('true');
      const replay = await post(second.http, '/filtered-payments', filtered).expect(402);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(shaped);
    } finally {
      await second.close();
    }
  });

  it('a filter reading a Date field of the exception shapes the replay as the first answer', async () => {
    const key = newKey();
    const first = await boot(platform, shared.dataSource);
    let shaped: unknown;
    try {
      shaped = (await post(first.http, '/dated-payments', key).expect(402)).body;
    } finally {
      await first.close();
    }
    const second = await boot(platform, shared.dataSource);
    try {
      const replay = await post(second.http, '/dated-payments', key);
      expect(replay.status).toBe(402);
      expect(replay.body).toEqual(shaped);
    } finally {
      await second.close();
    }
  });

  describe('one app', () => {
    let app: App;
    beforeAll(async () => (app = await boot(platform, shared.dataSource)));
    afterAll(() => app.close());

    it('a HEAD route of its own is not its GET: a GET with its key runs the GET', async () => {
      const key = newKey();
      const head = await request(app.http).head('/docs/1').set('Idempotency-Key', key);
      expect(head.status).toBe(200);
      expect(runsOf('head', key)).toBe(1);
      const get = await request(app.http).get('/docs/1').set('Idempotency-Key', key);
      expect(get.status).toBe(200);
      expect(get.body).toEqual({ id: '1', content: 'the whole document' });
    });

    it("replays a header the handler set over the middleware's value, as the first answer had it", async () => {
      const key = newKey();
      const first = await post(app.http, '/docs/cached', key).expect(201);
      expect(first.headers['cache-control']).toBe('private, max-age=60');
      const retry = await post(app.http, '/docs/cached', key).expect(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.headers['cache-control']).toBe('private, max-age=60');
    });

    it("replays an error past the app's filter for another class of the same name, as the first answer", async () => {
      const key = newKey();
      const first = await post(app.http, '/docs/refused', key).expect(409);
      expect(first.body).toEqual({ statusCode: 409, message: 'payments: not allowed' });
      const retry = await post(app.http, '/docs/refused', key).expect(409);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(runsOf('refused', key)).toBe(1);
    });

    it('stores and replays an error whose fields are larger than a MySQL TEXT column', async () => {
      const key = newKey();
      const first = await post(app.http, '/docs/batch', key).expect(409);
      const retry = await post(app.http, '/docs/batch', key).expect(409);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(runsOf('batch', key)).toBe(1);
    });

    describe('a body no parser read, which the handler reads itself', () => {
      const sha256 = (bytes: Buffer) => createHash('sha256').update(bytes).digest('hex');
      const head = (key: string, length: number) =>
        `POST /docs/raw HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n` +
        `Content-Type: application/octet-stream\r\nContent-Length: ${length}\r\nIdempotency-Key: ${key}\r\n\r\n`;
      const send = (key: string, body: Buffer) =>
        request(app.http)
          .post('/docs/raw')
          .set('Idempotency-Key', key)
          .set('Content-Type', 'application/octet-stream')
          .send(body);

      it('reads a body that arrives slowly, in pieces, and replays it for the same bytes sent at once', async () => {
        const key = newKey();
        const body = Buffer.from('a body that arrives in three pieces');
        const socket = net.connect({ host: '127.0.0.1', port: app.port });
        const answer = new Promise<string>((resolve, reject) => {
          const chunks: Buffer[] = [];
          socket.on('data', (chunk: Buffer) => chunks.push(chunk));
          socket.on('end', () => resolve(Buffer.concat(chunks).toString()));
          socket.on('error', reject);
        });
        const arrived = arrival(key);
        socket.write(head(key, body.length) + body.subarray(0, 5).toString());
        await arrived;
        socket.write(body.subarray(5, 20));
        await new Promise((resolve) => setImmediate(resolve));
        socket.write(body.subarray(20));
        const first = await answer;
        expect(first).toMatch(/^HTTP\/1\.1 201/);
        expect(first).toContain(`"sha256":"${sha256(body)}"`);
        const retry = await send(key, body).expect(201);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(retry.body).toMatchObject({ bytes: body.length, sha256: sha256(body) });
        expect(runsOf('raw', key)).toBe(1);
      });

      it('leaves no trace of a body whose client went away before sending it all', async () => {
        const key = newKey();
        const socket = net.connect({ host: '127.0.0.1', port: app.port });
        socket.on('error', () => undefined);
        const arrived = arrival(key);
        socket.write(head(key, 100_000) + 'x'.repeat(1000));
        const served = await arrived;
        const closed = new Promise((resolve) => served.once('close', resolve));
        socket.destroy();
        await closed;
        await new Promise((resolve) => setImmediate(resolve));
        const body = Buffer.from('the whole body, sent again');
        const retry = await send(key, body).expect(201);
        expect(retry.headers['idempotent-replayed']).toBeUndefined();
        expect(retry.body).toMatchObject({ bytes: body.length, sha256: sha256(body) });
        expect(runsOf('raw', key)).toBe(1);
      });

      it('answers 400 body-unreadable for one over 10 MiB, without running the handler', async () => {
        const key = newKey();
        const refused = await send(key, Buffer.alloc(10 * 1024 * 1024 + 1, 'x'));
        expectProblem(refused, 400, 'body-unreadable');
        expect(runsOf('raw', key)).toBe(0);
        const accepted = await send(key, Buffer.from('small')).expect(201);
        expect(accepted.body).toMatchObject({ bytes: 5 });
      });
    });

    it('replays a @Redirect() to the URL the handler chose', async () => {
      const key = newKey();
      const first = await post(app.http, '/docs/redirect', key).expect(303);
      const retry = await post(app.http, '/docs/redirect', key).expect(303);
      expect(retry.headers.location).toBe(first.headers.location);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(runsOf('redirect', key)).toBe(1);
    });
  });
});
