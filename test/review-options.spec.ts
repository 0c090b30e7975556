import {
  BadRequestException,
  Body,
  Controller,
  Module,
  Post,
  Res,
  type ExecutionContext,
  type INestApplication,
} from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { Args, Int, Mutation, Query, Resolver } from '@nestjs/graphql';
import {
  Ctx,
  MessagePattern,
  NatsContext,
  NatsRecordBuilder,
  Payload,
} from '@nestjs/microservices';
import { headers as natsHeaders } from '@nats-io/transport-node';
import { DocumentBuilder, SwaggerModule, type OpenAPIObject } from '@nestjs/swagger';
import { randomUUID } from 'node:crypto';
import { lastValueFrom } from 'rxjs';
import request from 'supertest';
import { Idempotent, IdempotencyModule, type IdempotencyRouteOptions } from '../lib/index.js';
import { resolveModuleOptions } from '../lib/idempotency.options.js';
import { expectProblem } from './support/http.js';
import { bootOptionsApp, optionsAppForSuite, rpcFailure, Runs } from './support/options-app.js';

/**
 * A reviewer's attempts to break the route options of issue 22 (keyFrom, fingerprint, scope,
 * storeIf, skip, replayHeaders, retryAfter, onReplay) as a user would: on Express and Fastify,
 * GraphQL and NATS. Each test is what the client sees and how often the handler ran.
 */

const runs = new Runs();
const TAG = `rev-opt-${randomUUID().slice(0, 8)}`;

/** A body nested `depth` levels deep: `{ a: { a: … } }`. */
const nested = (depth: number): object => {
  let value: object = {};
  for (let i = 0; i < depth; i++) value = { a: value };
  return value;
};

/** A storeIf that reads `error.code` of every outcome, also of a returned value (error undefined). */
@Controller('rev-store-if')
class StoreIfThrowsController {
  @Post()
  @Idempotent({ storeIf: (_status, error) => (error as { code: string }).code === 'final' })
  storeIfThrows(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }
}

@Controller('rev')
class ReviewController {
  @Post('items')
  @Idempotent({ keyFrom: { body: 'items.0.id' } })
  items(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('body-key')
  @Idempotent({ keyFrom: { body: 'id' } })
  bodyKey(@Body() body: { marker?: string }) {
    return { run: runs.ran(body?.marker ?? 'body-key') };
  }

  @Post('header-key')
  @Idempotent({ keyFrom: { header: 'X-Request-Id' } })
  headerKey(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('fn-http-error')
  @Idempotent({
    keyFrom: () => {
      throw new BadRequestException('no order id');
    },
  })
  fnHttpError() {
    return { run: runs.ran('fn-http-error') };
  }

  @Post('fn-async')
  @Idempotent({
    keyFrom: ((context: ExecutionContext) =>
      Promise.resolve(
        context.switchToHttp().getRequest<{ body: { ref: string } }>().body.ref,
      )) as never,
  })
  fnAsync(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  /** A fingerprint of the body's items: the client chooses how deep they are. */
  @Post('fingerprint-items')
  @Idempotent({ fingerprint: (body: { items?: unknown }) => body.items })
  fingerprintItems(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  /** A fingerprint function with a bug: its value refers to itself. */
  @Post('fingerprint-cyclic')
  @Idempotent({
    fingerprint: (body: { marker: string }) => {
      const value: Record<string, unknown> = { marker: body.marker };
      value.self = value;
      return value;
    },
  })
  fingerprintCyclic(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('fn-async-rejects')
  @Idempotent({ keyFrom: () => Promise.reject(new BadRequestException('no order id yet')) })
  fnAsyncRejects() {
    return { run: runs.ran('fn-async-rejects') };
  }

  @Post('fingerprint-date')
  @Idempotent({ fingerprint: (body: { at: string }) => new Date(body.at) })
  fingerprintDate(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('no-fingerprint-a')
  @Idempotent({ keyFrom: { body: 'id' }, fingerprint: false })
  noFingerprintA(@Body() body: { marker: string }) {
    return { route: 'a', run: runs.ran(body.marker) };
  }

  @Post('no-fingerprint-b')
  @Idempotent({ keyFrom: { body: 'id' }, fingerprint: false })
  noFingerprintB(@Body() body: { marker: string }) {
    return { route: 'b', run: runs.ran(body.marker) };
  }

  @Post('async-skip')
  @Idempotent({
    skip: ((context: ExecutionContext) =>
      Promise.resolve(
        context.switchToHttp().getRequest<{ headers: Record<string, string> }>().headers[
          'x-probe'
        ] === '1',
      )) as never,
  })
  asyncSkip(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('truthy-skip')
  @Idempotent({
    skip: ((context: ExecutionContext) =>
      context.switchToHttp().getRequest<{ headers: Record<string, string> }>().headers[
        'x-probe'
      ]) as never,
  })
  truthySkip(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('no-replay-headers')
  @Idempotent({ replayHeaders: [] })
  noReplayHeaders(@Body() body: { marker: string }, @Res({ passthrough: true }) response: any) {
    const run = runs.ran(body.marker);
    if (typeof response.header === 'function') response.header('X-Charge-Id', `ch_${run}`);
    else response.setHeader('X-Charge-Id', `ch_${run}`);
    return { run };
  }

  @Post('slow-replay-hook')
  @Idempotent({ onReplay: () => new Promise<void>((resolve) => setTimeout(resolve, 3000)) })
  slowReplayHook(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }
}

describe.each(['express', 'fastify'] as const)('route options under review (%s)', (platform) => {
  const fixture = optionsAppForSuite({ platform, controllers: [ReviewController] });

  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    request(fixture.http)
      .post(path)
      .set(headers)
      .send(body as object);

  it("a body path into an array ('items.0.id') reads the first item's id", async () => {
    const marker = randomUUID();
    const id = randomUUID();
    await post('/rev/items', { marker, items: [{ id }] }).expect(201);
    const again = await post('/rev/items', { marker, items: [{ id }] }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(marker)).toBe(1);
  });

  it.each<[string, unknown]>([
    ['a float', 1.5],
    ['1e21', 1e21],
    ['a boolean', true],
    ['an object', { id: 'x' }],
    ['an array', ['x']],
  ])('a body key that is %s is 400 key-invalid naming the path', async (_case, id) => {
    const response = await post('/rev/body-key', { id });
    expectProblem(response, 400, 'key-invalid');
    expect(response.body.detail).toMatch(/body's id/);
  });

  it("a negative integer body key is its decimal string's key (-5 and '-5' are one key)", async () => {
    const marker = randomUUID();
    const id = -Math.floor(Math.random() * 1e12);
    await post('/rev/body-key', { marker, id }).expect(201);
    const again = await post('/rev/body-key', { marker, id }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    // One key, another body (a string where the first had a number): the same record refuses it.
    expectProblem(await post('/rev/body-key', { marker, id: String(id) }), 422, 'key-reused');
    expect(runs.of(marker)).toBe(1);
  });

  it('a body that is not JSON (text/plain) has no key: 400 key-missing, nothing runs', async () => {
    const before = runs.of('body-key');
    const response = await request(fixture.http)
      .post('/rev/body-key')
      .set('Content-Type', 'text/plain')
      .send('id=abc');
    expect(response.status).toBeGreaterThanOrEqual(400);
    expect(response.status).toBeLessThan(500);
    expect(runs.of('body-key')).toBe(before);
  });

  it('a __proto__ member in a JSON body is no key (Express) or refused by the parser (Fastify)', async () => {
    const response = await request(fixture.http)
      .post('/rev/body-key')
      .set('Content-Type', 'application/json')
      .send('{"__proto__":{"id":"from-proto"},"marker":"proto"}');
    if (platform === 'express') expectProblem(response, 400, 'key-missing');
    else expect(response.status).toBe(400);
    expect(runs.of('proto')).toBe(0);
  });

  it('a keyFrom function that throws an HttpException answers with it', async () => {
    const response = await post('/rev/fn-http-error', {});
    expect(response.status).toBe(400);
    expect(response.body.message).toBe('no order id');
    expect(runs.of('fn-http-error')).toBe(0);
  });

  it('a keyFrom function that returns a promise: its value is the key', async () => {
    const marker = randomUUID();
    const ref = randomUUID();
    await post('/rev/fn-async', { marker, ref }).expect(201);
    const again = await post('/rev/fn-async', { marker, ref }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(marker)).toBe(1);
  });

  it('a fingerprint of a body nested too deep is 400 body-unreadable, not a 500', async () => {
    const marker = randomUUID();
    const response = await post(
      '/rev/fingerprint-items',
      { marker, items: nested(1500) },
      { 'Idempotency-Key': randomUUID() },
    );
    expectProblem(response, 400, 'body-unreadable');
    expect(runs.of(marker)).toBe(0);
  });

  it("a fingerprint function's cyclic value is the app's bug: a 500, the handler does not run", async () => {
    const marker = randomUUID();
    const response = await post(
      '/rev/fingerprint-cyclic',
      { marker },
      { 'Idempotency-Key': randomUUID() },
    );
    expect(response.status).toBe(500);
    expect(runs.of(marker)).toBe(0);
  });

  it('an async keyFrom that rejects with an HttpException answers with it', async () => {
    const response = await post('/rev/fn-async-rejects', {});
    expect(response.status).toBe(400);
    expect(response.body.message).toBe('no order id yet');
    expect(runs.of('fn-async-rejects')).toBe(0);
  });

  it('a fingerprint returning a Date compares by its time', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const at = '2026-01-01T00:00:00.000Z';
    await post('/rev/fingerprint-date', { marker, at }, { 'Idempotency-Key': key }).expect(201);
    const same = await post(
      '/rev/fingerprint-date',
      { marker, at: '2026-01-01T01:00:00+01:00' },
      { 'Idempotency-Key': key },
    ).expect(201);
    expect(same.headers['idempotent-replayed']).toBe('true');
    expectProblem(
      await post(
        '/rev/fingerprint-date',
        { marker, at: '2026-01-02T00:00:00Z' },
        { 'Idempotency-Key': key },
      ),
      422,
      'key-reused',
    );
    expect(runs.of(marker)).toBe(1);
  });

  it('fingerprint: false and one key on two routes: two records, each route runs once', async () => {
    const marker = randomUUID();
    const id = randomUUID();
    const a = await post('/rev/no-fingerprint-a', { marker, id }).expect(201);
    const b = await post('/rev/no-fingerprint-b', { marker, id }).expect(201);
    expect(a.body.route).toBe('a');
    expect(b.body.route).toBe('b');
    const againA = await post('/rev/no-fingerprint-a', { marker, id, other: 1 }).expect(201);
    expect(againA.body).toEqual(a.body);
    expect(runs.of(marker)).toBe(2);
  });

  it('an async skip that resolves false does not skip the call', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await post('/rev/async-skip', { marker }, { 'Idempotency-Key': key }).expect(201);
    const again = await post('/rev/async-skip', { marker }, { 'Idempotency-Key': key }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(marker)).toBe(1);
    await post('/rev/async-skip', { marker }, { 'Idempotency-Key': key, 'X-Probe': '1' }).expect(
      201,
    );
    expect(runs.of(marker)).toBe(2);
  });

  it('a skip returning a truthy non-boolean skips', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await post('/rev/truthy-skip', { marker }, { 'Idempotency-Key': key, 'X-Probe': 'yes' });
    await post('/rev/truthy-skip', { marker }, { 'Idempotency-Key': key, 'X-Probe': 'yes' });
    expect(runs.of(marker)).toBe(2);
  });

  it('replayHeaders: [] replays no handler header, only Content-Type', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await post('/rev/no-replay-headers', { marker }, { 'Idempotency-Key': key });
    expect(first.headers['x-charge-id']).toBe('ch_1');
    const again = await post('/rev/no-replay-headers', { marker }, { 'Idempotency-Key': key });
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.headers['x-charge-id']).toBeUndefined();
    expect(again.headers['content-type']).toMatch(/^application\/json/);
  });

  it('a slow onReplay does not hold the replay', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await post('/rev/slow-replay-hook', { marker }, { 'Idempotency-Key': key }).expect(201);
    const started = Date.now();
    const again = await post('/rev/slow-replay-hook', { marker }, { 'Idempotency-Key': key });
    expect(again.headers['idempotent-replayed']).toBe('true');
    // The hook takes 3 s; a replay that waited for it would take as long.
    expect(Date.now() - started).toBeLessThan(2500);
  });
});

describe.each(['express', 'fastify'] as const)('a storeIf that throws (%s)', (platform) => {
  it('boots (with @nestjs/swagger installed), answers, and leaves the key released, logged', async () => {
    const fixture = await bootOptionsApp({ platform, controllers: [StoreIfThrowsController] });
    try {
      const marker = randomUUID();
      const key = randomUUID();
      const send = () =>
        request(fixture.http).post('/rev-store-if').set('Idempotency-Key', key).send({ marker });
      expect((await send()).status).toBe(201);
      // Not a 409 request-in-progress until lockTimeout: the key was released.
      expect((await send()).status).toBe(201);
      expect(runs.of(marker)).toBe(2);
      expect(
        fixture.log.lines.some(
          (line) =>
            line.level === 'error' &&
            /storeIf of StoreIfThrowsController\.storeIfThrows/.test(line.text),
        ),
      ).toBe(true);
    } finally {
      await fixture.close();
    }
  });
});

/** Scoped by the class (per transport, HTTP only); one method opts out with `scope: false`. */
@Controller('rev-scope')
@Idempotent({
  scope: { http: (req: { headers: Record<string, string> }) => req.headers['x-tenant'] },
})
class ScopedController {
  @Post('scoped')
  scoped(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('shared')
  @Idempotent({ scope: false })
  shared(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }
}

describe('scope: false under a module and a class scope', () => {
  const fixture = optionsAppForSuite({
    controllers: [ScopedController],
    module: { scope: () => 'module-scope-never-used' },
  });

  const send = (path: string, tenant: string, key: string, marker: string) =>
    request(fixture.http)
      .post(path)
      .set({ 'Idempotency-Key': key, 'X-Tenant': tenant })
      .send({ marker });

  it("the class's resolver replaces the module's; the method's false shares one namespace", async () => {
    const key = randomUUID();
    const scoped = randomUUID();
    await send('/rev-scope/scoped', 't1', key, scoped).expect(201);
    const other = await send('/rev-scope/scoped', 't2', key, scoped).expect(201);
    expect(other.headers['idempotent-replayed']).toBeUndefined();
    expect(runs.of(scoped)).toBe(2);
    const shared = randomUUID();
    await send('/rev-scope/shared', 't1', key, shared).expect(201);
    const again = await send('/rev-scope/shared', 't2', key, shared).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(shared)).toBe(1);
  });
});

describe('bad option values fail at startup, naming the option', () => {
  it.each<[string, IdempotencyRouteOptions, RegExp]>([
    ['retryAfter of true', { retryAfter: true as never }, /retryAfter/],
    ['retryAfter of null', { retryAfter: null as never }, /retryAfter/],
    ['ttl of an object', { ttl: {} as never }, /ttl/],
    ['keyFrom __proto__ path', { keyFrom: { body: '__proto__.id' } }, /keyFrom\.body/],
    ['keyFrom constructor path', { keyFrom: { body: 'a.constructor' } }, /keyFrom\.body/],
    ['replayHeaders SeT-CoOkIe', { replayHeaders: ['SeT-CoOkIe'] }, /set-cookie/],
    ['fingerprint of true', { fingerprint: true as never }, /fingerprint must be/],
  ])('%s', (_case, options, message) => {
    expect(() => Idempotent(options)).toThrow(message);
  });

  it.each<[number | string, number]>([
    ['0s', 0],
    ['1ms', 1],
    [1500, 2],
    ['1.5s', 2],
    ['36525d', 36525 * 86400],
  ])('retryAfter %p is a Retry-After of %p seconds', (retryAfter, seconds) => {
    expect(resolveModuleOptions({ retryAfter }).retryAfterSeconds).toBe(seconds);
  });

  it('storeIf on a base controller and storeStatuses on its subclass are two levels, not both', async () => {
    @Idempotent({ storeIf: (status) => status < 300 })
    class BaseController {}
    @Controller('levels')
    @Idempotent({ storeStatuses: [201] })
    class LevelsController extends BaseController {
      @Post()
      create() {
        return { ok: true };
      }
    }
    const fixture = await bootOptionsApp({ controllers: [LevelsController] });
    try {
      await request(fixture.http)
        .post('/levels')
        .set('Idempotency-Key', randomUUID())
        .send({})
        .expect(201);
    } finally {
      await fixture.close();
    }
  });
});

@Controller('doc')
class DocumentedController {
  @Post('webhook')
  @Idempotent({ keyFrom: { body: 'id' }, scope: false, fingerprint: false })
  webhook() {
    return { received: true };
  }

  @Post('slow')
  @Idempotent({ retryAfter: '5s' })
  slow() {
    return { ok: true };
  }
}

@Idempotent({ keyFrom: { header: 'X-Delivery' } })
class BaseReceiver {}

@Controller('doc-inherited')
@Idempotent({ ttl: '3d' })
class InheritedReceiver extends BaseReceiver {
  @Post()
  receive() {
    return { received: true };
  }
}

describe('OpenAPI of the route options', () => {
  let app: INestApplication;
  let document: OpenAPIObject;
  beforeAll(async () => {
    @Module({
      imports: [
        IdempotencyModule.forRoot({
          dataSource: { type: 'better-sqlite3', database: ':memory:' },
          purgeInterval: false,
        }),
      ],
      controllers: [DocumentedController, InheritedReceiver, StoreIfThrowsController],
    })
    class DocModule {}
    app = await NestFactory.create(DocModule, { logger: false, abortOnError: false });
    document = SwaggerModule.createDocument(app, new DocumentBuilder().build());
  });
  afterAll(() => app?.close());

  const responses = (path: string) =>
    (document.paths[path].post as { responses: Record<string, { headers?: object }> }).responses;
  const headerNames = (path: string) =>
    (
      (document.paths[path].post as { parameters?: { in: string; name: string }[] }).parameters ??
      []
    )
      .filter((parameter) => parameter.in === 'header')
      .map((parameter) => parameter.name);

  it('a fingerprint: false route documents no 422 (a key never mismatches)', () => {
    expect(Object.keys(responses('/doc/webhook'))).not.toContain('422');
    expect(Object.keys(responses('/doc/slow'))).toContain('422');
  });

  it("the 409's Retry-After shows the route's retryAfter", () => {
    const conflict = responses('/doc/slow')['409'] as unknown as {
      headers: Record<string, { schema: { example?: number } }>;
    };
    expect(conflict.headers['Retry-After'].schema.example).toBe(5);
  });

  it("documents a subclass's inherited keyFrom header, as the interceptor reads it", () => {
    expect(headerNames('/doc-inherited')).toEqual(['X-Delivery']);
  });
});

@Resolver()
class ReviewResolver {
  @Query(() => String)
  ping() {
    return 'pong';
  }

  @Mutation(() => Int)
  @Idempotent({ keyFrom: { arg: 'ref' } })
  byArg(@Args('ref', { type: () => Number }) _ref: number, @Args('marker') marker: string) {
    return runs.ran(marker);
  }

  @Mutation(() => Int)
  @Idempotent({ keyFrom: { header: 'X-Request-Id' } })
  byHeader(@Args('marker') marker: string) {
    return runs.ran(marker);
  }
}

describe('route options under review on GraphQL', () => {
  const fixture = optionsAppForSuite({ graphql: true, providers: [ReviewResolver] });

  const mutate = (query: string, variables: object, headers: Record<string, string> = {}) =>
    request(fixture.http).post('/graphql').set(headers).send({ query, variables });

  it('a Float argument key is refused as key-invalid, the resolver does not run', async () => {
    const marker = randomUUID();
    const response = await mutate(
      'mutation M($marker: String!) { byArg(ref: 1.5, marker: $marker) }',
      { marker },
    );
    expect(response.body.errors?.[0]?.extensions?.code).toBe('IDEMPOTENCY_KEY_INVALID');
    expect(runs.of(marker)).toBe(0);
  });

  it('keyFrom header without the header: key-missing', async () => {
    const marker = randomUUID();
    const response = await mutate('mutation M($marker: String!) { byHeader(marker: $marker) }', {
      marker,
    });
    expect(response.body.errors?.[0]?.extensions?.code).toBe('IDEMPOTENCY_KEY_MISSING');
    expect(runs.of(marker)).toBe(0);
  });
});

@Controller()
class ReviewHandler {
  @MessagePattern(`${TAG}.by-header`)
  @Idempotent({ keyFrom: { header: 'X-Event-Id' } })
  byHeader(@Payload() data: { marker: string }, @Ctx() _context: NatsContext) {
    return runs.ran(data.marker);
  }

  @MessagePattern(`${TAG}.by-payload`)
  @Idempotent({ keyFrom: { payload: 'meta.ids.0' } })
  byPayload(@Payload() data: { marker: string }) {
    return runs.ran(data.marker);
  }
}

const NATS_URL = process.env.NATS_URL;
(NATS_URL ? describe : describe.skip)('route options under review on NATS', () => {
  const fixture = optionsAppForSuite({ controllers: [ReviewHandler], natsUrl: NATS_URL });

  const send = (pattern: string, data: unknown) =>
    lastValueFrom(fixture.nats!.send(`${TAG}.${pattern}`, data));
  const failure = (pattern: string, data: unknown) => rpcFailure(send(pattern, data));

  it("a payload path into an array ('meta.ids.0')", async () => {
    const marker = randomUUID();
    const id = randomUUID();
    expect(await send('by-payload', { marker, meta: { ids: [id] } })).toBe(1);
    expect(await send('by-payload', { marker, meta: { ids: [id] } })).toBe(1);
    expect(await failure('by-payload', { marker, meta: { ids: [1.5] } })).toMatchObject({
      code: 'key-invalid',
    });
  });

  it('a NATS header sent twice is refused as on HTTP', async () => {
    const marker = randomUUID();
    const headers = natsHeaders();
    headers.append('X-Event-Id', 'first');
    headers.append('X-Event-Id', 'second');
    const record = new NatsRecordBuilder({ marker }).setHeaders(headers).build();
    expect(await failure('by-header', record)).toMatchObject({ code: 'key-invalid' });
    expect(runs.of(marker)).toBe(0);
  });
});
