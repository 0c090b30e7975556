/**
 * IdempotencyAdmin in the app's own process, on every store: a key under two endpoints is listed
 * by `inspect` and makes `forget` refuse until the endpoint is given; a forgotten key runs its
 * handler on the next request though this process had it in its replay cache; a release refuses a
 * completed record; every action is logged with its actor and published on the admin channel; a
 * sealed body is opened with the module's keys only.
 */
import { Body, Controller, Module, Post, type INestApplication } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { Redis } from 'ioredis';
import { randomBytes, randomUUID } from 'node:crypto';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import request from 'supertest';
import { DataSource } from 'typeorm';
import {
  IDEMPOTENCY_ADMIN_CHANNEL,
  IdempotencyAdmin,
  IdempotencyAdminRefusal,
  IdempotencyModule,
  IdempotencyRecord,
  Idempotent,
  RedisIdempotencyStore,
  type AdminActionMessage,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases } from './support/databases.js';

let runs = 0;

@Controller()
class AdminSpecController {
  @Post('orders')
  @Idempotent()
  order(@Body() body: { amount: number }) {
    runs++;
    return { run: runs, amount: body.amount };
  }

  @Post('refunds')
  @Idempotent()
  refund(@Body() body: { amount: number }) {
    runs++;
    return { run: runs, refunded: body.amount };
  }
}

interface StoreUnderTest {
  readonly name: string;
  open(): Promise<{ options: Partial<IdempotencyModuleOptions>; close: () => Promise<void> }>;
}

const stores: StoreUnderTest[] = [
  ...testDatabases
    .filter((database) => !database.pooler)
    .map((database) => ({
      name: database.name,
      async open() {
        const dataSource = new DataSource({
          ...database.options(),
          entities: [IdempotencyRecord],
        } as never);
        await dataSource.initialize();
        return { options: { dataSource }, close: () => dataSource.destroy() };
      },
    })),
  ...(process.env.REDIS_URL
    ? [
        {
          name: 'redis',
          async open() {
            const redis = new Redis(process.env.REDIS_URL!);
            const store = new RedisIdempotencyStore(redis, {
              prefix: `admin-spec-${randomUUID().slice(0, 8)}:`,
            });
            return {
              options: { store },
              close: async () => {
                await store.close();
                redis.disconnect();
              },
            };
          },
        },
      ]
    : []),
];

async function boot(options: Partial<IdempotencyModuleOptions>) {
  @Module({ imports: [IdempotencyModule.forRoot(options)], controllers: [AdminSpecController] })
  class AdminSpecModule {}
  const log = new CapturedLog();
  const moduleRef = await Test.createTestingModule({ imports: [AdminSpecModule] }).compile();
  const app = moduleRef.createNestApplication({ logger: log });
  await app.init();
  return { app, log, admin: app.get(IdempotencyAdmin) };
}

const send = (app: INestApplication, path: string, key: string, amount: number) =>
  request(app.getHttpServer()).post(path).set('Idempotency-Key', key).send({ amount });

describe.each(stores)('IdempotencyAdmin on $name', (store) => {
  let app: INestApplication;
  let log: CapturedLog;
  let admin: IdempotencyAdmin;
  let close: () => Promise<void>;

  beforeAll(async () => {
    const opened = await store.open();
    close = opened.close;
    ({ app, log, admin } = await boot(opened.options));
  });
  afterAll(async () => {
    await app?.close();
    await close?.();
  });

  it('inspect lists the key under each endpoint; forget refuses until told which; the forgotten one runs again though this process cached it', async () => {
    const key = `admin-${randomUUID()}`;
    const order = await send(app, '/orders', key, 3).expect(201);
    await send(app, '/refunds', key, 3).expect(201);
    // Replayed once: this process holds it in its replay cache now.
    const replay = await send(app, '/orders', key, 3).expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');

    const records = await admin.inspect(key, { actor: 'alice' });
    expect(records.map((r) => r.endpoint).sort()).toEqual(['POST /orders', 'POST /refunds']);
    expect(records[0]).toMatchObject({
      key,
      scope: '',
      state: 'completed',
      status: 201,
      lockedUntil: null,
      expired: false,
      bodyEncoding: 'json',
    });
    expect(records[0].body).toBeUndefined();
    const [withBody] = await admin.inspect(key, {
      actor: 'alice',
      endpoint: 'POST /orders',
      body: true,
    });
    expect(JSON.parse(withBody.body!)).toEqual(order.body);

    const ambiguous = await admin.forget(key, { actor: 'alice' }).catch((error: unknown) => error);
    expect(ambiguous).toBeInstanceOf(IdempotencyAdminRefusal);
    expect(ambiguous).toMatchObject({ reason: 'ambiguous' });
    expect((ambiguous as IdempotencyAdminRefusal).records).toHaveLength(2);
    await expect(
      admin.release(key, { actor: 'alice', endpoint: 'POST /orders' }),
    ).rejects.toMatchObject({ reason: 'wrong-state' });

    const messages: AdminActionMessage[] = [];
    const onMessage = (message: unknown) => messages.push(message as AdminActionMessage);
    subscribe(IDEMPOTENCY_ADMIN_CHANNEL, onMessage);
    try {
      const forgotten = await admin.forget(key, { actor: 'alice', endpoint: 'POST /orders' });
      expect(forgotten).toMatchObject({ endpoint: 'POST /orders', state: 'completed' });
    } finally {
      unsubscribe(IDEMPOTENCY_ADMIN_CHANNEL, onMessage);
    }
    expect(messages).toEqual([
      {
        action: 'forget',
        actor: 'alice',
        id: { scope: '', endpoint: 'POST /orders', key },
        outcome: 'done',
      },
    ]);
    expect(log.lines).toContainEqual(
      expect.objectContaining({
        level: 'warn',
        context: 'IdempotencyAdmin',
        text: expect.stringMatching(
          /^forget of key admin-.{2}… on POST \/orders by "alice": deleted/,
        ),
      }),
    );
    expect(log.lines.some((line) => line.text.includes(key))).toBe(false);

    const runsBefore = runs;
    const again = await send(app, '/orders', key, 3).expect(201);
    expect(again.headers['idempotent-replayed']).toBeUndefined();
    expect(again.body).toEqual({ run: runsBefore + 1, amount: 3 });
    const refund = await send(app, '/refunds', key, 3).expect(201);
    expect(refund.headers['idempotent-replayed']).toBe('true');
    expect(runs).toBe(runsBefore + 1);
    expect(await admin.inspect(key, { actor: 'alice' })).toHaveLength(2);
  });

  it('list finds records by state and age; forget of an unknown key is refused', async () => {
    const key = `admin-${randomUUID()}`;
    await send(app, '/orders', key, 4).expect(201);
    const listed = await admin.list({
      actor: 'bob',
      state: 'completed',
      endpoint: 'POST /orders',
      limit: 10_000,
    });
    expect(listed.map((r) => r.key)).toContain(key);
    expect(
      (await admin.list({ actor: 'bob', state: 'completed', olderThan: '1h', limit: 10_000 })).map(
        (r) => r.key,
      ),
    ).not.toContain(key);
    expect(
      (await admin.list({ actor: 'bob', state: 'in_progress', limit: 10_000 })).map((r) => r.key),
    ).not.toContain(key);
    await expect(admin.forget(randomUUID(), { actor: 'bob' })).rejects.toMatchObject({
      reason: 'not-found',
    });
  });
});

describe('IdempotencyAdmin and encryption', () => {
  it('opens a sealed body with the module keys; without them it stays sealed', async () => {
    const key = randomBytes(32).toString('base64');
    const { app, admin } = await boot({ encryption: { keys: [key] } });
    try {
      const idempotencyKey = randomUUID();
      const order = await send(app, '/orders', idempotencyKey, 9).expect(201);
      const [opened] = await admin.inspect(idempotencyKey, { actor: 'carol', body: true });
      expect(opened.bodyEncoding).toBe('sealed');
      expect(JSON.parse(opened.body!)).toEqual(order.body);

      const keyless = new IdempotencyAdmin((admin as unknown as { store: never }).store, {
        replayCache: undefined,
        sealer: undefined,
      });
      const [sealed] = await keyless.inspect(idempotencyKey, { actor: 'carol', body: true });
      expect(sealed).toMatchObject({ bodyEncoding: 'sealed', sealed: true });
      expect(sealed.body).toBeUndefined();
    } finally {
      await app.close();
    }
  });
});
