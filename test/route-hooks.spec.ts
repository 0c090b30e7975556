import {
  Body,
  Catch,
  Controller,
  Header,
  HttpException,
  Injectable,
  Post,
  Res,
  UseFilters,
  type ArgumentsHost,
  type ExceptionFilter,
} from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import { Args, Mutation, Query, Resolver } from '@nestjs/graphql';
import { MessagePattern, Payload } from '@nestjs/microservices';
import { randomUUID } from 'node:crypto';
import { lastValueFrom } from 'rxjs';
import request from 'supertest';
import { Idempotent, type IdempotencyRouteOptions, type ReplayedResponse } from '../lib/index.js';
import { expectProblem } from './support/http.js';
import { bootOptionsApp, optionsAppForSuite, rpcFailure, Runs } from './support/options-app.js';

/**
 * The route hooks of issue 22 — `storeIf`, `skip`, `replayHeaders`, `retryAfter`, `onReplay` — on
 * HTTP (Express and Fastify), GraphQL and NATS, as the client sees them.
 */

const runs = new Runs();
const TAG = `hooks-${randomUUID().slice(0, 8)}`;

/** A domain error that is not an HttpException: an exception filter renders it as a 402. */
class InsufficientFunds extends Error {
  constructor(readonly balance: number) {
    super('insufficient funds');
  }
}

@Catch(InsufficientFunds)
@Injectable()
class FundsFilter implements ExceptionFilter {
  constructor(private readonly adapterHost: HttpAdapterHost) {}
  catch(error: InsufficientFunds, host: ArgumentsHost) {
    const { httpAdapter } = this.adapterHost;
    httpAdapter.reply(
      host.switchToHttp().getResponse(),
      { code: 'insufficient-funds', balance: error.balance, runs: runs.of('funds-filter') },
      402,
    );
  }
}

/** Held until released: a first request still running while its duplicate arrives. */
const gates = new Map<string, () => void>();
const held = (marker: string) => new Promise<void>((resolve) => gates.set(marker, resolve));
const release = (marker: string) => gates.get(marker)?.();
const until = async (condition: () => boolean) => {
  while (!condition()) await new Promise((resolve) => setImmediate(resolve));
};

const replays: ReplayedResponse[] = [];
const finalOutcomes: IdempotencyRouteOptions['storeIf'] = (status, error) =>
  error instanceof InsufficientFunds || status < 300;

@Controller('hooks')
@UseFilters(FundsFilter)
class HooksController {
  @Post('pay')
  @Idempotent({ storeIf: finalOutcomes })
  pay(@Body() body: { marker: string; fail?: 'funds' | 'http' }) {
    const run = runs.ran(body.marker);
    if (body.fail === 'funds') throw new InsufficientFunds(run);
    if (body.fail === 'http') throw new HttpException({ run }, 409);
    return { run };
  }

  /** Without storeIf: the domain error is a crash, its key released. */
  @Post('pay-default')
  @Idempotent()
  payDefault(@Body() body: { marker: string }) {
    throw new InsufficientFunds(runs.ran(body.marker));
  }

  @Post('probe')
  @Idempotent({ skip: (context) => context.switchToHttp().getRequest().headers['x-probe'] === '1' })
  probe(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('headers')
  @Header('X-Route', 'static')
  @Idempotent({ replayHeaders: ['X-Charge-Id', 'location'] })
  headers(@Body() body: { marker: string }, @Res({ passthrough: true }) response: any) {
    const run = runs.ran(body.marker);
    const set = (name: string, value: string) =>
      typeof response.header === 'function'
        ? response.header(name, value)
        : response.setHeader(name, value);
    set('X-Charge-Id', `ch_${run}`);
    set('X-Debug', `debug-${run}`);
    set('Location', `/charges/${run}`);
    return { run };
  }

  @Post('slow')
  @Idempotent({ retryAfter: '5s' })
  async slow(@Body() body: { marker: string }) {
    const run = runs.ran(body.marker);
    await held(body.marker);
    return { run };
  }

  @Post('watched')
  @Idempotent({ onReplay: (_context, stored) => void replays.push(stored) })
  watched(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('hook-throws')
  @Idempotent({
    onReplay: () => {
      throw new Error('metrics backend down');
    },
  })
  hookThrows(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }

  @Post('hook-rejects')
  @Idempotent({ onReplay: () => Promise.reject(new Error('async metrics backend down')) })
  hookRejects(@Body() body: { marker: string }) {
    return { run: runs.ran(body.marker) };
  }
}

describe.each(['express', 'fastify'] as const)('route hooks on HTTP (%s)', (platform) => {
  const fixture = optionsAppForSuite({ platform, controllers: [HooksController] });

  const send = (path: string, key: string | undefined, body: object, headers = {}) => {
    const call = request(fixture.http).post(path).set(headers);
    if (key !== undefined) call.set('Idempotency-Key', key);
    return call.send(body);
  };

  it('storeIf stores a domain error a filter renders: the retry gets the same 402, the handler ran once', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await send('/hooks/pay', key, { marker, fail: 'funds' }).expect(402);
    expect(first.body).toMatchObject({ code: 'insufficient-funds', balance: 1 });
    const again = await send('/hooks/pay', key, { marker, fail: 'funds' }).expect(402);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(first.body);
    expect(runs.of(marker)).toBe(1);
  });

  it('storeIf decides HttpExceptions by their status too; without it the domain error is released', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    // 409 is not final under this storeIf (status < 300 or the domain error): released.
    await send('/hooks/pay', key, { marker, fail: 'http' }).expect(409);
    await send('/hooks/pay', key, { marker, fail: 'http' }).expect(409);
    expect(runs.of(marker)).toBe(2);
    const other = randomUUID();
    const otherKey = randomUUID();
    await send('/hooks/pay-default', otherKey, { marker: other }).expect(402);
    const retried = await send('/hooks/pay-default', otherKey, { marker: other }).expect(402);
    expect(retried.headers['idempotent-replayed']).toBeUndefined();
    expect(runs.of(other)).toBe(2);
  });

  it('skip: a probe runs as if the route had no @Idempotent(), with or without a key', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await send('/hooks/probe', key, { marker }, { 'X-Probe': '1' }).expect(201);
    const again = await send('/hooks/probe', key, { marker }, { 'X-Probe': '1' }).expect(201);
    expect(again.headers['idempotent-replayed']).toBeUndefined();
    await send('/hooks/probe', undefined, { marker }, { 'X-Probe': '1' }).expect(201);
    expect(runs.of(marker)).toBe(3);
    expectProblem(await send('/hooks/probe', undefined, { marker }), 400, 'key-missing');
    await send('/hooks/probe', key, { marker }).expect(201);
    const replay = await send('/hooks/probe', key, { marker }).expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(runs.of(marker)).toBe(4);
  });

  it('replayHeaders: a replay sends the listed headers (and Content-Type) only', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await send('/hooks/headers', key, { marker }).expect(201);
    expect(first.headers['x-debug']).toBe('debug-1');
    const again = await send('/hooks/headers', key, { marker }).expect(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.headers['x-charge-id']).toBe('ch_1');
    expect(again.headers.location).toBe('/charges/1');
    expect(again.headers['content-type']).toMatch(/^application\/json/);
    expect(again.headers['x-debug']).toBeUndefined();
    // Set by the route's @Header() before the interceptor on every call: the retry's own.
    expect(again.headers['x-route']).toBe('static');
    expect(again.body).toEqual(first.body);
  });

  it('retryAfter: a duplicate of a running request gets 409 with that Retry-After', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = send('/hooks/slow', key, { marker }).then((response) => response);
    await until(() => runs.of(marker) === 1);
    const duplicate = await send('/hooks/slow', key, { marker });
    expectProblem(duplicate, 409, 'request-in-progress');
    expect(duplicate.headers['retry-after']).toBe('5');
    release(marker);
    expect((await first).status).toBe(201);
    expect(runs.of(marker)).toBe(1);
  });

  it('onReplay is told of each replay; a hook that throws or rejects is logged, the replay unchanged', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const before = replays.length;
    const first = await send('/hooks/watched', key, { marker }).expect(201);
    expect(replays.length).toBe(before);
    await send('/hooks/watched', key, { marker }).expect(201);
    expect(replays.slice(before)).toEqual([
      expect.objectContaining({
        key,
        endpoint: 'POST /hooks/watched',
        status: 201,
        isError: false,
      }),
    ]);
    for (const path of ['/hooks/hook-throws', '/hooks/hook-rejects']) {
      const other = randomUUID();
      const original = await send(path, key, { marker: other }).expect(201);
      const replay = await send(path, key, { marker: other }).expect(201);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
      expect(runs.of(other)).toBe(1);
    }
    await until(() =>
      fixture.log.lines.some((line) => line.text.includes('async metrics backend down')),
    );
    const errors = fixture.log.lines.filter((line) => line.level === 'error');
    expect(
      errors.some((line) => /onReplay hook of HooksController\.hookThrows/.test(line.text)),
    ).toBe(true);
    expect(first.body).toEqual({ run: 1 });
  });
});

@Resolver()
class HooksResolver {
  @Query(() => String)
  ping() {
    return 'pong';
  }

  @Mutation(() => Number)
  @Idempotent({ storeIf: finalOutcomes })
  debit(@Args('marker') marker: string) {
    throw new InsufficientFunds(runs.ran(marker));
  }

  @Mutation(() => Number)
  @Idempotent({
    skip: (context) => context.getArgs()[2]?.req?.headers['x-probe'] === '1',
    onReplay: (_context, stored) => void replays.push(stored),
  })
  credit(@Args('marker') marker: string) {
    return runs.ran(marker);
  }

  @Mutation(() => Number)
  @Idempotent({ retryAfter: '7s' })
  async hold(@Args('marker') marker: string) {
    const run = runs.ran(marker);
    await held(marker);
    return run;
  }
}

describe('route hooks on GraphQL', () => {
  const fixture = optionsAppForSuite({ graphql: true, providers: [HooksResolver] });

  /** The key in the Idempotency-Key header of the GraphQL request. */
  const mutate = (field: string, marker: string, key: string, headers = {}) =>
    request(fixture.http)
      .post('/graphql')
      .set({ 'Idempotency-Key': key, ...headers })
      .send({
        query: `mutation M($marker: String!) { ${field}(marker: $marker) }`,
        variables: { marker },
      });

  it('storeIf: a domain error is stored and replayed with its message; the resolver ran once', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = await mutate('debit', marker, key);
    const again = await mutate('debit', marker, key);
    expect(first.body.errors?.[0]?.message).toBe('insufficient funds');
    expect(again.body.errors?.[0]?.message).toBe('insufficient funds');
    expect(runs.of(marker)).toBe(1);
  });

  it('skip and onReplay', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    await mutate('credit', marker, key, { 'X-Probe': '1' });
    await mutate('credit', marker, key, { 'X-Probe': '1' });
    expect(runs.of(marker)).toBe(2);
    const before = replays.length;
    const first = await mutate('credit', marker, key);
    const again = await mutate('credit', marker, key);
    expect(again.body).toEqual(first.body);
    expect(runs.of(marker)).toBe(3);
    expect(replays.slice(before)).toEqual([
      expect.objectContaining({ key, endpoint: 'GRAPHQL Mutation.credit as credit' }),
    ]);
  });

  it('retryAfter: the in-progress error carries retryAfterSeconds', async () => {
    const marker = randomUUID();
    const key = randomUUID();
    const first = mutate('hold', marker, key).then((response) => response);
    await until(() => runs.of(marker) === 1);
    const duplicate = await mutate('hold', marker, key);
    expect(duplicate.body.errors?.[0]?.extensions).toMatchObject({
      code: 'IDEMPOTENCY_REQUEST_IN_PROGRESS',
      retryAfterSeconds: 7,
    });
    release(marker);
    expect((await first).body.data?.hold).toBe(1);
  });
});

@Controller()
class HooksHandler {
  @MessagePattern(`${TAG}.debit`)
  @Idempotent({ storeIf: finalOutcomes })
  debit(@Payload() data: { marker: string }) {
    throw new InsufficientFunds(runs.ran(data.marker));
  }

  @MessagePattern(`${TAG}.credit`)
  @Idempotent({
    skip: (context) => (context.switchToRpc().getData() as { probe?: boolean }).probe === true,
    onReplay: (_context, stored) => void replays.push(stored),
  })
  credit(@Payload() data: { marker: string }) {
    return runs.ran(data.marker);
  }

  @MessagePattern(`${TAG}.hold`)
  @Idempotent({ retryAfter: '3s', concurrency: 'reject' })
  async hold(@Payload() data: { marker: string }) {
    const run = runs.ran(data.marker);
    await held(data.marker);
    return run;
  }
}

const NATS_URL = process.env.NATS_URL;
(NATS_URL ? describe : describe.skip)('route hooks on NATS', () => {
  const fixture = optionsAppForSuite({ controllers: [HooksHandler], natsUrl: NATS_URL });

  const send = (pattern: string, data: object) =>
    lastValueFrom(fixture.nats!.send(`${TAG}.${pattern}`, data));
  const failure = (pattern: string, data: object) => rpcFailure(send(pattern, data));

  it('storeIf: a domain error is the stored answer; a duplicate gets the same error without running', async () => {
    const marker = randomUUID();
    const idempotencyKey = randomUUID();
    const first = await failure('debit', { marker, idempotencyKey });
    expect(first).toMatchObject({ status: 'error' });
    expect(await failure('debit', { marker, idempotencyKey })).toEqual(first);
    expect(runs.of(marker)).toBe(1);
  });

  it('skip and onReplay', async () => {
    const marker = randomUUID();
    const idempotencyKey = randomUUID();
    await send('credit', { marker, idempotencyKey, probe: true });
    await send('credit', { marker, idempotencyKey, probe: true });
    expect(runs.of(marker)).toBe(2);
    const before = replays.length;
    expect(await send('credit', { marker, idempotencyKey })).toBe(3);
    expect(await send('credit', { marker, idempotencyKey })).toBe(3);
    expect(replays.slice(before)).toEqual([expect.objectContaining({ key: idempotencyKey })]);
  });

  it('retryAfter: the in-progress RpcException carries retryAfterSeconds', async () => {
    const marker = randomUUID();
    const idempotencyKey = randomUUID();
    const first = send('hold', { marker, idempotencyKey });
    await until(() => runs.of(marker) === 1);
    expect(await failure('hold', { marker, idempotencyKey })).toMatchObject({
      code: 'request-in-progress',
      retryAfterSeconds: 3,
    });
    release(marker);
    expect(await first).toBe(1);
  });
});

describe('bad hook options are refused at startup, naming the option', () => {
  it.each<[string, IdempotencyRouteOptions, RegExp]>([
    [
      'replayHeaders listing Set-Cookie',
      { replayHeaders: ['Set-Cookie'] },
      /replayHeaders must not list set-cookie/,
    ],
    [
      'replayHeaders of a string',
      { replayHeaders: 'location' as never },
      /replayHeaders must be an array/,
    ],
    [
      'storeIf and storeStatuses together',
      { storeIf: () => true, storeStatuses: [200] },
      /storeIf or storeStatuses/,
    ],
    ['storeIf of a list', { storeIf: [200] as never }, /storeIf must be a function/],
    ['skip of true', { skip: true as never }, /skip must be a function/],
    ['onReplay of a string', { onReplay: 'log' as never }, /onReplay must be a function/],
    ['retryAfter of a word', { retryAfter: 'soon' }, /retryAfter/],
    ['retryAfter negative', { retryAfter: -1 }, /retryAfter/],
  ])('%s', (_case, options, message) => {
    expect(() => Idempotent(options)).toThrow(message);
  });

  it('on the module: replayHeaders with set-cookie fails forRoot', async () => {
    await expect(
      bootOptionsApp({ controllers: [HooksController], module: { replayHeaders: ['set-cookie'] } }),
    ).rejects.toThrow(/replayHeaders must not list set-cookie/);
  });
});
