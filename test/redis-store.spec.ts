import { Module, type INestApplication } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { Redis, type RedisOptions } from 'ioredis';
import { randomUUID } from 'node:crypto';
import {
  IdempotencyModule,
  RedisIdempotencyStore,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { FixtureController } from './fixtures/fixture.controller.js';
import { CallLog, HandlerGate } from './fixtures/handler-probes.js';
import { expectProblem, newKey, post } from './support/http.js';
import { TcpProxy } from './support/tcp-proxy.js';

const redisUrl = process.env.REDIS_URL;

/** One app on its own Redis connection, as one process of a deployment would be. */
interface RedisApp {
  readonly app: INestApplication;
  readonly http: any;
  readonly calls: CallLog;
  readonly gate: HandlerGate;
  close(): Promise<void>;
}

/** What the README recommends for the store's client: fail at once while Redis is away. */
const storeClientOptions: RedisOptions = { enableOfflineQueue: false, maxRetriesPerRequest: 0 };

async function bootRedisApp(
  url: string,
  prefix: string,
  options: Partial<IdempotencyModuleOptions> = {},
  clientOptions: RedisOptions = storeClientOptions,
): Promise<RedisApp> {
  const redis = new Redis(url, clientOptions);
  // A lazyConnect client connects on its first command.
  if (!clientOptions.lazyConnect) {
    await new Promise<void>((resolve, reject) => {
      redis.once('ready', resolve);
      redis.once('error', reject);
    });
  }
  const store = new RedisIdempotencyStore(redis, { prefix });
  @Module({
    imports: [IdempotencyModule.forRoot({ store, ...options })],
    controllers: [FixtureController],
    providers: [CallLog, HandlerGate],
  })
  class RedisAppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [RedisAppModule] }).compile();
  const app = moduleRef.createNestApplication({ logger: false });
  await app.init();
  return {
    app,
    http: app.getHttpServer(),
    calls: app.get(CallLog),
    gate: app.get(HandlerGate),
    async close() {
      await app.close();
      redis.disconnect();
    },
  };
}

/** Resolves once a connection subscribes to `channel` (checked with PUBSUB NUMSUB). */
async function waitForSubscriber(channel: string): Promise<void> {
  const probe = new Redis(redisUrl!);
  try {
    for (let attempt = 0; attempt < 500; attempt++) {
      const [, count] = (await probe.pubsub('NUMSUB', channel)) as [string, number];
      if (Number(count) > 0) return;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    throw new Error(`nobody subscribed to ${channel}`);
  } finally {
    probe.disconnect();
  }
}

(redisUrl ? describe : describe.skip)('the Redis store, end to end', () => {
  const prefix = `e2e-${randomUUID()}:`;
  let first: RedisApp;
  let second: RedisApp;
  beforeAll(async () => {
    // A poll interval longer than any wait here: a waiter is woken by pub/sub or not at all.
    const options = { waitPollInterval: '30s' as const };
    first = await bootRedisApp(redisUrl!, prefix, options);
    second = await bootRedisApp(redisUrl!, prefix, options);
  });
  afterAll(async () => {
    await first?.close();
    await second?.close();
  });

  const runs = (route: string, key: string) =>
    first.calls.count(route, key) + second.calls.count(route, key);

  it('runs once and replays across instances; another payload is 422; a stored error replays', async () => {
    const key = newKey();
    const created = await post(first.http, '/charges', key, { amount: 10 }).expect(201);
    const replay = await post(second.http, '/charges', key, { amount: 10 }).expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(created.body);
    expect(replay.headers.location).toBe('/charges/latest');
    expectProblem(await post(second.http, '/charges', key, { amount: 11 }), 422, 'key-reused');
    expect(runs('charges', key)).toBe(1);

    const declined = newKey();
    const refusal = await post(first.http, '/declined', declined).expect(402);
    const again = await post(second.http, '/declined', declined).expect(402);
    expect(again.body).toEqual(refusal.body);
    expect(runs('declined', declined)).toBe(1);
  });

  it('a duplicate in flight is 409 on the other instance; a crash releases the key', async () => {
    const key = newKey();
    first.gate.hold(key);
    const running = post(first.http, '/slow', key).then((response) => response);
    await first.gate.arrived(key);
    expectProblem(await post(second.http, '/slow', key), 409, 'request-in-progress');
    first.gate.open(key);
    expect((await running).status).toBe(201);

    const crashed = newKey();
    expect((await post(first.http, '/flaky', crashed, { fail: 'crash' })).status).toBe(500);
    await post(second.http, '/flaky', crashed, { fail: 'no' }).expect(201);
    expect(runs('flaky', crashed)).toBe(2);
  });

  it('wakes a waiter on another instance through pub/sub', async () => {
    const key = newKey();
    first.gate.hold(key);
    const running = post(first.http, '/slow-wait', key).then((response) => response);
    await first.gate.arrived(key);
    const waiting = post(second.http, '/slow-wait', key).then((response) => response);
    // The waiter watches once it found the key in progress: its instance subscribes then.
    await waitForSubscriber(`${prefix}changes`);
    first.gate.open(key);
    const [original, woken] = await Promise.all([running, waiting]);
    expect(original.status).toBe(201);
    expect(woken.status).toBe(201);
    expect(woken.headers['idempotent-replayed']).toBe('true');
    expect(woken.body).toEqual(original.body);
    expect(runs('slow-wait', key)).toBe(1);
  }, 30_000);

  it('a storm of 200 requests over 20 keys on two instances: one run per key, every answer that key’s', async () => {
    const keys = Array.from({ length: 20 }, () => newKey());
    const requests = Array.from({ length: 200 }, (_, i) => {
      const key = keys[i % keys.length];
      return post((i % 2 ? first : second).http, '/slow-wait', key).then((response) => ({
        key,
        response,
      }));
    });
    const answers = await Promise.all(requests);
    for (const key of keys) {
      expect(runs('slow-wait', key)).toBe(1);
      const bodies = new Set(
        answers
          .filter((answer) => answer.key === key)
          .map((answer) => JSON.stringify([answer.response.status, answer.response.body])),
      );
      expect(bodies.size).toBe(1);
    }
  }, 60_000);
});

(redisUrl ? describe : describe.skip)('the Redis store when Redis goes away', () => {
  let proxy: TcpProxy;
  let fixture: RedisApp;
  beforeAll(async () => {
    const target = new URL(redisUrl!);
    proxy = await TcpProxy.start({ host: target.hostname, port: Number(target.port || 6379) });
    fixture = await bootRedisApp(proxy.proxiedUrl(redisUrl!), `outage-${randomUUID()}:`, {
      storeTimeout: 500,
    });
  });
  afterAll(async () => {
    await fixture?.close();
    await proxy?.close();
  });

  it('answers 503 without running the handler, then runs the same key once when it is back', async () => {
    const key = newKey();
    await proxy.cut();
    expectProblem(
      await post(fixture.http, '/charges', key, { amount: 1 }),
      503,
      'store-unavailable',
    );
    expect(fixture.calls.count('charges', key)).toBe(0);
    await proxy.restore();
    let answer = await post(fixture.http, '/charges', key, { amount: 1 });
    // ioredis reconnects with backoff: until it has, the answer is the same 503.
    for (let attempt = 0; answer.status === 503 && attempt < 100; attempt++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      answer = await post(fixture.http, '/charges', key, { amount: 1 });
    }
    expect(answer.status).toBe(201);
    expect(
      (await post(fixture.http, '/charges', key, { amount: 1 })).headers['idempotent-replayed'],
    ).toBe('true');
    expect(fixture.calls.count('charges', key)).toBe(1);
  }, 30_000);
});

(redisUrl ? describe : describe.skip)('the Redis store on a lazyConnect client', () => {
  const prefix = `lazy-${randomUUID()}:`;
  let first: RedisApp;
  let second: RedisApp;
  beforeAll(async () => {
    const options = { waitPollInterval: '30s' as const };
    const lazy = { lazyConnect: true };
    first = await bootRedisApp(redisUrl!, prefix, options, lazy);
    second = await bootRedisApp(redisUrl!, prefix, options, lazy);
  });
  afterAll(async () => {
    await first?.close();
    await second?.close();
  });

  it('wakes a waiter through pub/sub: its subscriber connects too', async () => {
    const key = newKey();
    first.gate.hold(key);
    const running = post(first.http, '/slow-wait', key).then((response) => response);
    await first.gate.arrived(key);
    const waiting = post(second.http, '/slow-wait', key).then((response) => response);
    try {
      await waitForSubscriber(`${prefix}changes`);
    } finally {
      first.gate.open(key);
    }
    const [original, woken] = await Promise.all([running, waiting]);
    expect(woken.status).toBe(201);
    expect(woken.headers['idempotent-replayed']).toBe('true');
    expect(woken.body).toEqual(original.body);
    expect(first.calls.count('slow-wait', key) + second.calls.count('slow-wait', key)).toBe(1);
  });
});
