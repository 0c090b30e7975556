import request from 'supertest';
import { DataSource } from 'typeorm';
import { IdempotencyRecord } from '../lib/index.js';
import { createShapesApp, type ShapesApp } from './fixtures/app-shapes.js';
import { recordsOf } from './fixtures/fixture-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachTarget, type HttpPlatform, type TestDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';
import { buildRequest, rawRequest } from './support/raw-http.js';

/** The stored response headers of a key's one record. */
async function storedHeaders(
  dataSource: DataSource,
  key: string,
): Promise<Record<string, unknown>> {
  const [record] = await recordsOf(dataSource, key);
  return JSON.parse(record.responseHeaders ?? '{}');
}

/**
 * A first request on one app, its retry on a second app on the same database (a restart, or
 * another instance); both apps are closed, the DataSource is left open.
 */
async function acrossRestart(
  database: TestDatabase,
  platform: HttpPlatform,
  dataSource: DataSource,
  first: (app: ShapesApp) => Promise<void>,
  retry: (app: ShapesApp) => Promise<void>,
): Promise<void> {
  for (const step of [first, retry]) {
    const app = await createShapesApp(database, platform, {}, { dataSource });
    try {
      await step(app);
    } finally {
      await app.close();
    }
  }
}

/** A DataSource that every app of a describe block shares (PGlite is one database per process). */
function sharedDataSource(database: TestDatabase) {
  const shared = { dataSource: undefined as unknown as DataSource };
  beforeAll(async () => {
    shared.dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await shared.dataSource.initialize();
  });
  afterAll(() => shared.dataSource.destroy());
  return shared;
}

describe.each(eachTarget)('an ordinary app on %s', (_name, { database, platform }) => {
  const shared = sharedDataSource(database);
  let shapes: ShapesApp;
  beforeAll(
    async () =>
      (shapes = await createShapesApp(database, platform, {}, { dataSource: shared.dataSource })),
  );
  afterAll(() => shapes.close());

  describe("the current request's own headers", () => {
    it("replays the handler's headers, and keeps the request id, rate-limit count and CORS origin of the retry", async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/orders', key, { total: 7 })
        .set('Origin', 'https://a.example')
        .expect(201);
      expect(first.headers['access-control-allow-origin']).toBe('https://a.example');
      const retry = await post(shapes.http, '/shapes/orders', key, { total: 7 })
        .set('Origin', 'https://b.example')
        .expect(201);

      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(retry.headers['x-order-total']).toBe('7');
      expect(retry.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
      expect(retry.headers['x-request-id']).not.toBe(first.headers['x-request-id']);
      expect(Number(retry.headers['x-ratelimit-remaining'])).toBeLessThan(
        Number(first.headers['x-ratelimit-remaining']),
      );
      expect(retry.headers['access-control-allow-origin']).toBe('https://b.example');
      expect(retry.headers.vary).toBe(first.headers.vary);
      expect(shapes.calls.count('orders', key)).toBe(1);
    });

    it('stores only the headers set inside the interceptor, not those of middleware, guards or CORS', async () => {
      const key = newKey();
      await post(shapes.http, '/shapes/orders', key, { total: 3 })
        .set('Origin', 'https://a.example')
        .expect(201);
      const names = Object.keys(await storedHeaders(shapes.dataSource, key)).map((name) =>
        name.toLowerCase(),
      );
      expect(names).toContain('x-order-total');
      for (const name of [
        'x-request-id',
        'x-ratelimit-remaining',
        'access-control-allow-origin',
        'vary',
      ])
        expect(names).not.toContain(name);
    });

    it("a record an earlier version stored with the request's headers does not overwrite the retry's", async () => {
      const key = newKey();
      const origin = 'https://b.example';
      let first: request.Response | undefined;
      await acrossRestart(
        database,
        platform,
        shared.dataSource,
        async (app) => {
          first = await post(app.http, '/shapes/orders', key, { total: 5 })
            .set('Origin', 'https://a.example')
            .expect(201);
          // What the earlier version stored: every header the response had when it was captured.
          await app.dataSource.getRepository(IdempotencyRecord).update(
            { key },
            {
              responseHeaders: JSON.stringify({
                'x-request-id': 'stale-request-id',
                'x-ratelimit-remaining': '999999',
                'access-control-allow-origin': 'https://a.example',
                vary: 'Origin',
                'x-order-total': '5',
              }),
            },
          );
        },
        async (app) => {
          const retry = await post(app.http, '/shapes/orders', key, { total: 5 })
            .set('Origin', origin)
            .expect(201);
          expect(retry.headers['idempotent-replayed']).toBe('true');
          expect(retry.body).toEqual(first!.body);
          expect(retry.headers['x-order-total']).toBe('5');
          expect(retry.headers['x-request-id']).not.toBe('stale-request-id');
          expect(retry.headers['x-ratelimit-remaining']).not.toBe('999999');
          expect(retry.headers['access-control-allow-origin']).toBe(origin);
          expect(retry.headers.vary).toBe('Origin');
          expect(app.calls.count('orders', key)).toBe(0);
        },
      );
    });
  });

  describe('a replay with another status than the route’s', () => {
    it('replays with replayStatus', async () => {
      const key = newKey();
      await post(shapes.http, '/shapes/orders-200', key).expect(201);
      const retry = await post(shapes.http, '/shapes/orders-200', key).expect(200);
      expect(retry.headers['idempotent-replayed']).toBe('true');
    });

    it('lets an interceptor around it answer an error with the error’s own status', async () => {
      const key = newKey();
      await post(shapes.http, '/shapes/orders-200', key).expect(201);
      const failed = await post(shapes.http, '/shapes/orders-200', key).set('X-Fail-After', '1');
      expect(failed.status).toBe(409);
      expect(failed.body).toMatchObject({ statusCode: 409, message: 'failed after the handler' });
      expect(shapes.calls.count('orders-200', key)).toBe(1);
    });
  });

  describe('a replayed error and the exception filters', () => {
    it("reaches the route's filter for its class (@UseFilters), as the first answer did", async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/pay', key).expect(402);
      expect(first.body).toMatchObject({
        shapedBy: 'PaymentRequiredFilter',
        kind: 'PaymentRequiredException',
      });
      const retry = await post(shapes.http, '/shapes/pay', key).expect(402);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(shapes.calls.count('pay', key)).toBe(1);
    });

    it("reaches the filter of its parent class when it is a subclass of the filter's", async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/pay', key, { declined: true }).expect(402);
      expect(first.body).toMatchObject({ kind: 'CardDeclinedException' });
      const retry = await post(shapes.http, '/shapes/pay', key, { declined: true }).expect(402);
      expect(retry.body).toEqual(first.body);
    });

    it("reaches the app's filter (APP_FILTER) for its class", async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/stock', key).expect(409);
      expect(first.body).toMatchObject({ shapedBy: 'OutOfStockFilter' });
      const retry = await post(shapes.http, '/shapes/stock', key).expect(409);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(shapes.calls.count('stock', key)).toBe(1);
    });

    it('reaches the same filters when a fresh app instance replays it (a restart)', async () => {
      const keys = { pay: newKey(), declined: newKey(), stock: newKey() };
      const firsts: Record<string, unknown> = {};
      await acrossRestart(
        database,
        platform,
        shared.dataSource,
        async (app) => {
          firsts.pay = (await post(app.http, '/shapes/pay', keys.pay).expect(402)).body;
          firsts.declined = (
            await post(app.http, '/shapes/pay', keys.declined, { declined: true }).expect(402)
          ).body;
          firsts.stock = (await post(app.http, '/shapes/stock', keys.stock).expect(409)).body;
        },
        async (app) => {
          const pay = await post(app.http, '/shapes/pay', keys.pay).expect(402);
          const declined = await post(app.http, '/shapes/pay', keys.declined, {
            declined: true,
          }).expect(402);
          const stock = await post(app.http, '/shapes/stock', keys.stock).expect(409);
          for (const replay of [pay, declined, stock])
            expect(replay.headers['idempotent-replayed']).toBe('true');
          expect(pay.body).toEqual(firsts.pay);
          expect(declined.body).toEqual(firsts.declined);
          expect(stock.body).toEqual(firsts.stock);
          expect(app.calls.count('pay', keys.pay)).toBe(0);
        },
      );
    });
  });

  describe('methods', () => {
    it.each(['get', 'put', 'patch'] as const)(
      'replays %s with the status and body of the first answer',
      async (method) => {
        const key = newKey();
        const send = () => {
          const call = request(shapes.http)[method]('/shapes/items/1').set('Idempotency-Key', key);
          return method === 'get' ? call : call.send({ name: 'x' });
        };
        const first = await send().expect(200);
        const retry = await send().expect(200);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(retry.body).toEqual(first.body);
        expect(shapes.calls.count(method === 'get' ? 'get:GET' : method, key)).toBe(1);
      },
    );

    it('replays a 204 without a body (DELETE)', async () => {
      const key = newKey();
      const first = await request(shapes.http)
        .delete('/shapes/items/1')
        .set('Idempotency-Key', key)
        .expect(204);
      const retry = await request(shapes.http)
        .delete('/shapes/items/1')
        .set('Idempotency-Key', key)
        .expect(204);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.text).toBe(first.text);
      expect(retry.text).toBe('');
      expect(shapes.calls.count('delete', key)).toBe(1);
    });

    it("answers a HEAD with a GET's key from the GET's record, without running the handler again", async () => {
      const key = newKey();
      const first = await request(shapes.http)
        .get('/shapes/items/1')
        .set('Idempotency-Key', key)
        .expect(200);
      const head = await request(shapes.http)
        .head('/shapes/items/1')
        .set('Idempotency-Key', key)
        .expect(200);
      expect(head.headers['idempotent-replayed']).toBe('true');
      expect(head.headers['content-type']).toBe(first.headers['content-type']);
      expect(shapes.calls.count('get:GET', key) + shapes.calls.count('get:HEAD', key)).toBe(1);
    });

    it('answers a GET with the key of an earlier HEAD from its record, body included', async () => {
      const key = newKey();
      await request(shapes.http).head('/shapes/items/2').set('Idempotency-Key', key).expect(200);
      const get = await request(shapes.http)
        .get('/shapes/items/2')
        .set('Idempotency-Key', key)
        .expect(200);
      expect(get.headers['idempotent-replayed']).toBe('true');
      expect(get.body).toMatchObject({ id: '2', read: expect.any(String) });
      expect(shapes.calls.count('get:HEAD', key)).toBe(1);
      expect(shapes.calls.count('get:GET', key)).toBe(0);
    });

    it('never sees a lowercase method: Node refuses it (400) before the app', async () => {
      const key = newKey();
      const answer = await rawRequest(
        shapes.port,
        buildRequest('post', '/shapes/orders', [['Idempotency-Key', key]]),
      );
      expect(answer.status).toBe(400);
      expect(shapes.calls.count('orders', key)).toBe(0);
      expect(await recordsOf(shapes.dataSource, key)).toHaveLength(0);
    });
  });

  describe('an ordinary app around it', () => {
    it('replays a status the handler set through @Res({ passthrough: true })', async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/orders', key, { accepted: true }).expect(202);
      const retry = await post(shapes.http, '/shapes/orders', key, { accepted: true }).expect(202);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
    });

    it('leaves a request refused by a guard (before the interceptor) without a record', async () => {
      const key = newKey();
      await post(shapes.http, '/shapes/orders', key).set('X-Deny', '1').expect(401);
      expect(await recordsOf(shapes.dataSource, key)).toHaveLength(0);
      await post(shapes.http, '/shapes/orders', key).expect(201);
      expect(shapes.calls.count('orders', key)).toBe(1);
    });

    it('fingerprints the body as sent, before ValidationPipe transforms it', async () => {
      const key = newKey();
      const first = await post(shapes.http, '/shapes/dto', key, { quantity: '2', sku: 'a' }).expect(
        201,
      );
      expect(first.body).toMatchObject({ isDto: true, order: { quantity: 2 }, total: 20 });
      const retry = await post(shapes.http, '/shapes/dto', key, { quantity: '2', sku: 'a' }).expect(
        201,
      );
      expect(retry.body).toEqual(first.body);
      // The same DTO once transformed, but another body: another request for the key.
      expectProblem(
        await post(shapes.http, '/shapes/dto', key, { quantity: 2, sku: 'a' }),
        422,
        'key-reused',
      );
      expect(shapes.calls.count('dto', key)).toBe(1);
    });
  });
});

describe.each(eachTarget)('scopes from request.user on %s', (_name, { database, platform }) => {
  let shapes: ShapesApp;
  const log = new CapturedLog();
  beforeAll(async () => (shapes = await createShapesApp(database, platform, {}, { logger: log })));
  afterAll(() => shapes.close());

  it("scopes keys by a numeric user id, as the README's `request.user?.id` gives it", async () => {
    const key = newKey();
    const alice = await post(shapes.http, '/shapes/mine', key).set('X-User', '42').expect(201);
    const bob = await post(shapes.http, '/shapes/mine', key).set('X-User', '7').expect(201);
    expect(alice.body.owner).toBe(42);
    expect(bob.body.owner).toBe(7);
    const retry = await post(shapes.http, '/shapes/mine', key).set('X-User', '42').expect(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(alice.body);
    expect((await recordsOf(shapes.dataSource, key)).map((r) => r.scope).sort()).toEqual([
      '42',
      '7',
    ]);
  });

  it('puts a caller without identity (the resolver returns undefined) in the empty scope', async () => {
    const key = newKey();
    const anonymous = await post(shapes.http, '/shapes/mine', key).expect(201);
    expect(anonymous.body.owner).toBeNull();
    expect((await recordsOf(shapes.dataSource, key)).map((r) => r.scope)).toEqual(['']);
  });

  it('warns once per route when an authenticated caller resolves to no identity', async () => {
    const warnings = () =>
      log.lines.filter(
        (line) => line.level === 'warn' && line.text.includes('ShapesController.mistypedScope'),
      );
    await post(shapes.http, '/shapes/mistyped-scope', newKey()).expect(201);
    expect(warnings()).toHaveLength(0);
    await post(shapes.http, '/shapes/mistyped-scope', newKey()).set('X-User', '1').expect(201);
    await post(shapes.http, '/shapes/mistyped-scope', newKey()).set('X-User', '2').expect(201);
    expect(warnings()).toHaveLength(1);
    expect(warnings()[0].text).toMatch(/`scope`/);
    expect(warnings()[0].text).toMatch(/request\.user/);
  });
});

describe.each(eachTarget)(
  'a global prefix and URI versioning on %s',
  (_name, { database, platform }) => {
    it('keys the record by the full route and replays on it', async () => {
      const shapes = await createShapesApp(database, platform, {}, { prefixed: true });
      try {
        const key = newKey();
        const first = await post(shapes.http, '/api/v1/shapes/orders', key).expect(201);
        const retry = await post(shapes.http, '/api/v1/shapes/orders', key).expect(201);
        expect(retry.body).toEqual(first.body);
        expect((await recordsOf(shapes.dataSource, key)).map((r) => r.endpoint)).toEqual([
          'POST /api/v1/shapes/orders',
        ]);
      } finally {
        await shapes.close();
      }
    });
  },
);
