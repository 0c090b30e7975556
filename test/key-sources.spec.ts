import {
  Body,
  Controller,
  Injectable,
  Param,
  Post,
  UseGuards,
  type CanActivate,
  type ExecutionContext,
} from '@nestjs/common';
import { Args, Field, InputType, Mutation, ObjectType, Query, Resolver } from '@nestjs/graphql';
import {
  Ctx,
  MessagePattern,
  NatsContext,
  NatsRecordBuilder,
  Payload,
} from '@nestjs/microservices';
import { headers as natsHeaders } from '@nats-io/transport-node';
import { randomUUID } from 'node:crypto';
import { lastValueFrom } from 'rxjs';
import request from 'supertest';
import { Idempotent, type IdempotencyRouteOptions } from '../lib/index.js';
import { expectProblem } from './support/http.js';
import { bootOptionsApp, optionsAppForSuite, rpcFailure, Runs } from './support/options-app.js';

/**
 * Where a key comes from (`keyFrom`), what a retry must repeat (`fingerprint`) and whose key it is
 * (`scope`), on HTTP (Express and Fastify), GraphQL and NATS: what the client sees, how often the
 * handler ran.
 */

const runs = new Runs();
const TAG = `opt-${randomUUID().slice(0, 8)}`;

/** Sets `request.user`, as Passport does, from an `x-user` header. */
@Injectable()
class UserFromHeader implements CanActivate {
  canActivate(context: ExecutionContext): boolean {
    const req = context.switchToHttp().getRequest();
    const user = req.headers['x-user'];
    if (user) req.user = { id: user };
    return true;
  }
}

@Controller('keys')
@UseGuards(UserFromHeader)
class KeysController {
  @Post('header')
  @Idempotent({ keyFrom: { header: 'X-Request-Id' } })
  header(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  /** A webhook receiver: the event's id is the key, one namespace, any payload replays. */
  @Post('webhook')
  @Idempotent({ keyFrom: { body: 'data.object.id' }, scope: false, fingerprint: false })
  webhook(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('optional-body')
  @Idempotent({ keyFrom: { body: 'ref' }, required: false })
  optionalBody(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('by-id/:id')
  @Idempotent({
    keyFrom: (context) => context.switchToHttp().getRequest<{ params: { id: string } }>().params.id,
  })
  byId(@Param('id') id: string, @Body() body: { marker: string }) {
    return { run: runs.ran(body.marker), id };
  }

  /** Only the amount must repeat: a retry may carry another `note`. */
  @Post('amount')
  @Idempotent({ fingerprint: (body: { amount: number }) => ({ amount: body.amount }) })
  amount(@Body() body: { marker: string; amount: number }) {
    return { run: runs.ran(body.marker), amount: body.amount };
  }

  /** The same fingerprint function on another route: the key there is its own record. */
  @Post('amount-too')
  @Idempotent({ fingerprint: (body: { amount: number }) => ({ amount: body.amount }) })
  amountToo(@Body() body: { marker: string; amount: number }) {
    return { run: runs.ran(body.marker), amount: body.amount };
  }

  @Post('tenant')
  @Idempotent({ scope: { http: (req) => req.headers['x-tenant'] } })
  tenant(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  /** No scope, none on purpose: an authenticated caller is warned about. */
  @Post('unscoped')
  @Idempotent()
  unscoped(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('shared')
  @Idempotent({ scope: false })
  shared(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }
}

describe.each(['express', 'fastify'] as const)('key sources on HTTP (%s)', (platform) => {
  const fixture = optionsAppForSuite({ platform, controllers: [KeysController] });

  const send = (path: string, body: object, headers: Record<string, string | string[]> = {}) => {
    const call = request(fixture.http).post(path);
    for (const [name, value] of Object.entries(headers)) call.set(name, value as string);
    return call.send(body);
  };

  it('{ header }: reads that header, not Idempotency-Key, and refuses it sent twice', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await send('/keys/header', { marker }, { 'X-Request-Id': key }).expect(201);
    const again = await send('/keys/header', { marker }, { 'x-request-id': key }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(first.body);
    expect(runs.of(marker)).toBe(1);
    expectProblem(
      await send('/keys/header', { marker }, { 'Idempotency-Key': randomUUID() }),
      400,
      'key-missing',
    );
    const twice = await send('/keys/header', { marker }, { 'X-Request-Id': [key, key] });
    expectProblem(twice, 400, 'key-invalid');
    expect(twice.body.detail).toMatch(/X-Request-Id header must be sent once/);
    expect(runs.of(marker)).toBe(1);
  });

  it('{ body }, fingerprint false, scope false: a redelivered event with a changed payload replays', async () => {
    const id = `evt_${randomUUID()}`;
    const marker = randomUUID();
    const first = await send('/keys/webhook', {
      marker,
      data: { object: { id } },
      attempt: 1,
    }).expect(201);
    const again = await send('/keys/webhook', {
      marker,
      data: { object: { id } },
      attempt: 2,
      delivered_at: Date.now(),
    }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(first.body);
    expect(runs.of(marker)).toBe(1);
  });

  it('{ body }: an integer is a key (42 and "42" are one), an object or a long string is refused', async () => {
    const id = Math.floor(Math.random() * 1e12);
    const marker = randomUUID();
    await send('/keys/webhook', { marker, data: { object: { id } } }).expect(201);
    const asText = await send('/keys/webhook', { marker, data: { object: { id: String(id) } } });
    expect(asText.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(marker)).toBe(1);

    const object = await send('/keys/webhook', { marker, data: { object: { id: { $gt: '' } } } });
    expectProblem(object, 400, 'key-invalid');
    expect(object.body.detail).toMatch(/data\.object\.id.*string or an integer/);
    const long = await send('/keys/webhook', { marker, data: { object: { id: 'k'.repeat(256) } } });
    expectProblem(long, 400, 'key-invalid');
    const control = await send('/keys/webhook', { marker, data: { object: { id: 'a\u0000b' } } });
    expectProblem(control, 400, 'key-invalid');
    expect(runs.of(marker)).toBe(1);
  });

  it('a source that yields nothing is a missing key: 400 when required, the handler runs otherwise', async () => {
    const marker = randomUUID();
    expectProblem(await send('/keys/webhook', { marker, data: {} }), 400, 'key-missing');
    expectProblem(
      await send('/keys/webhook', { marker, data: { object: { id: '' } } }),
      400,
      'key-missing',
    );
    expectProblem(
      await send('/keys/webhook', { marker, data: { object: { id: null } } }),
      400,
      'key-missing',
    );
    expect(runs.of(marker)).toBe(0);
    await send('/keys/optional-body', { marker }).expect(201);
    const unprotected = await send('/keys/optional-body', { marker }).expect(201);
    expect(unprotected.headers['idempotent-replayed']).toBeUndefined();
    expect(runs.of(marker)).toBe(2);
  });

  it('a function of the context: the path parameter is the key', async () => {
    const id = randomUUID();
    const marker = randomUUID();
    const first = await send(`/keys/by-id/${id}`, { marker }).expect(201);
    const again = await send(`/keys/by-id/${id}`, { marker }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(first.body);
    await send(`/keys/by-id/${randomUUID()}`, { marker }).expect(201);
    expect(runs.of(marker)).toBe(2);
  });

  it('fingerprint function: what it leaves out may change, what it keeps may not (422)', async () => {
    const key = randomUUID();
    const marker = randomUUID();
    const first = await send(
      '/keys/amount',
      { marker, amount: 5, note: 'first' },
      { 'Idempotency-Key': key },
    ).expect(201);
    const again = await send(
      '/keys/amount',
      { marker, amount: 5, note: 'second' },
      { 'Idempotency-Key': key },
    ).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(first.body);
    expectProblem(
      await send('/keys/amount', { marker, amount: 6 }, { 'Idempotency-Key': key }),
      422,
      'key-reused',
    );
    // The key on another route is that route's: it runs there.
    await send('/keys/amount-too', { marker, amount: 5 }, { 'Idempotency-Key': key }).expect(201);
    expect(runs.of(marker)).toBe(2);
  });

  it('scope per transport: two tenants with one key each get their own answer', async () => {
    const key = randomUUID();
    const marker = randomUUID();
    const headers = (tenant: string) => ({ 'Idempotency-Key': key, 'X-Tenant': tenant });
    const a = await send('/keys/tenant', { marker }, headers('a')).expect(201);
    const b = await send('/keys/tenant', { marker }, headers('b')).expect(201);
    expect(b.headers['idempotent-replayed']).toBeUndefined();
    expect(b.body).not.toEqual(a.body);
    const aAgain = await send('/keys/tenant', { marker }, headers('a')).expect(201);
    expect(aAgain.body).toEqual(a.body);
    expect(runs.of(marker)).toBe(2);
  });

  it('scope false shares one namespace on purpose: no warning about authenticated callers', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await send('/keys/shared', { marker }, { 'Idempotency-Key': key, 'X-User': 'u1' }).expect(201);
    const other = await send(
      '/keys/shared',
      { marker },
      { 'Idempotency-Key': key, 'X-User': 'u2' },
    ).expect(201);
    expect(other.headers['idempotent-replayed']).toBe('true');
    await send(
      '/keys/unscoped',
      { marker },
      { 'Idempotency-Key': randomUUID(), 'X-User': 'u1' },
    ).expect(201);
    const warnings = fixture.log.lines.filter((line) => line.level === 'warn');
    // Warned once per route and process: by the first app of this file that sees it.
    if (platform === 'express')
      expect(warnings.some((line) => line.text.includes('KeysController.unscoped'))).toBe(true);
    expect(warnings.some((line) => line.text.includes('KeysController.shared'))).toBe(false);
  });
});

@InputType()
class RefundInput {
  @Field()
  requestId!: string;
  @Field()
  amount!: number;
  @Field()
  marker!: string;
}

@ObjectType()
class Refund {
  @Field()
  run!: number;
}

@Resolver()
class RefundsResolver {
  @Query(() => String)
  ping() {
    return 'pong';
  }

  @Mutation(() => Refund)
  @Idempotent({ keyFrom: { arg: 'input.requestId' } })
  refund(@Args('input') input: RefundInput) {
    return { run: runs.ran(input.marker) };
  }

  @Mutation(() => Refund)
  @Idempotent({ keyFrom: { header: 'X-Request-Id' }, fingerprint: false })
  void(@Args('marker') marker: string, @Args('note') _note: string) {
    return { run: runs.ran(marker) };
  }
}

describe('key sources on GraphQL', () => {
  const fixture = optionsAppForSuite({ graphql: true, providers: [RefundsResolver] });

  const graphql = (query: string, variables: object, headers: Record<string, string> = {}) =>
    request(fixture.http).post('/graphql').set(headers).send({ query, variables });

  it('{ arg }: a path into the arguments; absent, the field gets IDEMPOTENCY_KEY_MISSING', async () => {
    const marker = randomUUID();
    const requestId = randomUUID();
    const query = 'mutation R($input: RefundInput!) { refund(input: $input) { run } }';
    const first = await graphql(query, { input: { requestId, amount: 5, marker } });
    const again = await graphql(query, { input: { requestId, amount: 5, marker } });
    expect(first.body.errors).toBeUndefined();
    expect(again.body).toEqual(first.body);
    const reused = await graphql(query, { input: { requestId, amount: 6, marker } });
    expect(reused.body.errors?.[0]?.extensions?.code).toBe('IDEMPOTENCY_KEY_REUSED');
    const empty = await graphql(query, { input: { requestId: '', amount: 5, marker } });
    expect(empty.body.errors?.[0]?.extensions?.code).toBe('IDEMPOTENCY_KEY_MISSING');
    expect(runs.of(marker)).toBe(1);
  });

  it('{ header } with fingerprint false: the header of the HTTP request, any arguments replay', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const query =
      'mutation V($marker: String!, $note: String!) { void(marker: $marker, note: $note) { run } }';
    const first = await graphql(query, { marker, note: 'a' }, { 'X-Request-Id': key });
    const again = await graphql(query, { marker, note: 'b' }, { 'X-Request-Id': key });
    expect(first.body.errors).toBeUndefined();
    expect(again.body).toEqual(first.body);
    const missing = await graphql(query, { marker, note: 'c' }, { 'Idempotency-Key': key });
    expect(missing.body.errors?.[0]?.extensions?.code).toBe('IDEMPOTENCY_KEY_MISSING');
    expect(runs.of(marker)).toBe(1);
  });
});

@Controller()
class BookingsHandler {
  @MessagePattern(`${TAG}.by-header`)
  @Idempotent({ keyFrom: { header: 'X-Delivery' } })
  byHeader(@Payload() data: { marker: string }, @Ctx() _context: NatsContext) {
    return { run: runs.ran(data.marker) };
  }

  @MessagePattern(`${TAG}.by-payload`)
  @Idempotent({ keyFrom: { payload: 'meta.eventId' }, fingerprint: false, scope: false })
  byPayload(@Payload() data: { marker: string }) {
    return { run: runs.ran(data.marker) };
  }

  @MessagePattern(`${TAG}.tenant`)
  @Idempotent({ scope: { rpc: ({ data }) => (data as { tenant: string }).tenant } })
  tenant(@Payload() data: { marker: string }) {
    return { run: runs.ran(data.marker) };
  }
}

const NATS_URL = process.env.NATS_URL;
(NATS_URL ? describe : describe.skip)('key sources on NATS', () => {
  const fixture = optionsAppForSuite({ controllers: [BookingsHandler], natsUrl: NATS_URL });

  const send = (pattern: string, data: object, header?: [string, string]) => {
    const h = natsHeaders();
    if (header) h.set(header[0], header[1]);
    return lastValueFrom(
      fixture.nats!.send(`${TAG}.${pattern}`, new NatsRecordBuilder(data).setHeaders(h).build()),
    );
  };
  const failure = (pattern: string, data: object, header?: [string, string]) =>
    rpcFailure(send(pattern, data, header));

  it('{ header }: the NATS header is the key', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await send('by-header', { marker }, ['X-Delivery', key]);
    expect(await send('by-header', { marker }, ['X-Delivery', key])).toEqual(first);
    expect(runs.of(marker)).toBe(1);
    expect((await failure('by-header', { marker, idempotencyKey: key })).code).toBe('key-missing');
  });

  it('{ payload } with fingerprint false: a payload path; another payload with the key replays', async () => {
    const marker = randomUUID();
    const eventId = randomUUID();
    const first = await send('by-payload', { marker, meta: { eventId }, n: 1 });
    expect(await send('by-payload', { marker, meta: { eventId }, n: 2 })).toEqual(first);
    expect(runs.of(marker)).toBe(1);
    const invalid = await failure('by-payload', { marker, meta: { eventId: [eventId] } });
    expect(invalid.code).toBe('key-invalid');
    expect(runs.of(marker)).toBe(1);
  });

  it('scope { rpc }: tenants keep their own keys', async () => {
    const marker = randomUUID();
    const idempotencyKey = randomUUID();
    const a = await send('tenant', { marker, idempotencyKey, tenant: 'a' });
    const b = await send('tenant', { marker, idempotencyKey, tenant: 'b' });
    expect(b).not.toEqual(a);
    expect(await send('tenant', { marker, idempotencyKey, tenant: 'a' })).toEqual(a);
    expect(runs.of(marker)).toBe(2);
  });
});

describe('bad key options are refused when the app starts, naming the option', () => {
  it.each<[string, IdempotencyRouteOptions, RegExp]>([
    ['a keyFrom with two sources', { keyFrom: { header: 'a', body: 'b' } as never }, /keyFrom/],
    ['a keyFrom of a number', { keyFrom: 42 as never }, /keyFrom must be a key source/],
    ['a header name with a space', { keyFrom: { header: 'X Key' } }, /keyFrom.header/],
    ['a path with an empty segment', { keyFrom: { body: 'data..id' } }, /keyFrom.body/],
    ['a path into the prototype', { keyFrom: { body: '__proto__.id' } }, /keyFrom.body/],
    ['a body source for GraphQL', { keyFrom: { graphql: { body: 'id' } } }, /graphql has no body/],
    ['a fingerprint of true', { fingerprint: true as never }, /fingerprint must be/],
    ['a scope string', { scope: 'tenant' as never }, /scope must be/],
    ['a scope of an unknown transport', { scope: { kafka: () => 1 } as never }, /scope has/],
  ])('%s', (_case, options, message) => {
    expect(() => Idempotent(options)).toThrow(message);
  });

  it('a key source the route cannot have: { payload } on an HTTP route', async () => {
    @Controller('wrong')
    class WrongController {
      @Post()
      @Idempotent({ keyFrom: { payload: 'id' } })
      create() {
        return {};
      }
    }
    await expect(bootOptionsApp({ controllers: [WrongController] })).rejects.toThrow(
      /WrongController\.create: keyFrom \{ payload \} reads nothing on an HTTP route/,
    );
  });

  it('on the module: a bad keyFrom fails forRoot', async () => {
    await expect(
      bootOptionsApp({
        controllers: [KeysController],
        module: { keyFrom: { query: 'k' } as never },
      }),
    ).rejects.toThrow(/keyFrom has an unknown member "query"/);
  });
});

describe('the OpenAPI document of key sources', () => {
  it('documents the header the route reads, and none when the key comes from the body', async () => {
    const { DocumentBuilder, SwaggerModule } = await import('@nestjs/swagger');
    const fixture = await bootOptionsApp({ controllers: [KeysController] });
    try {
      const document = SwaggerModule.createDocument(fixture.app, new DocumentBuilder().build());
      const headersOf = (path: string) =>
        ((document.paths[path]?.post?.parameters ?? []) as { in?: string; name?: string }[])
          .filter((parameter) => parameter.in === 'header')
          .map((parameter) => parameter.name);
      expect(headersOf('/keys/header')).toEqual(['X-Request-Id']);
      expect(headersOf('/keys/webhook')).toEqual([]);
      expect(headersOf('/keys/amount')).toEqual(['Idempotency-Key']);
    } finally {
      await fixture.close();
    }
  });
});
