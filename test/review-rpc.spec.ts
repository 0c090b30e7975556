import type { INestApplication, INestMicroservice } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  ClientProxyFactory,
  Transport,
  type ClientProxy,
  type MicroserviceOptions,
} from '@nestjs/microservices';
import { connect as connectAmqp, type Channel, type ChannelModel } from 'amqplib';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { lastValueFrom, toArray } from 'rxjs';
import { DataSource } from 'typeorm';
import { IdempotencyRecord } from '../lib/index.js';
import { latches, reviewModule, runs, settlements } from './fixtures/review-rpc-handlers.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases } from './support/databases.js';
import { runTag, waitFor } from './support/reliability.js';
import { TcpProxy } from './support/tcp-proxy.js';

const RABBITMQ_URL = process.env.RABBITMQ_URL;
const describeOnRabbitMq = RABBITMQ_URL ? describe : describe.skip;

describeOnRabbitMq('RabbitMQ, manual acknowledgement, consumers in the test process', () => {
  const tag = runTag('rvw');
  let dataSource: DataSource;
  let connection: ChannelModel;
  let channel: Channel;
  const apps: INestMicroservice[] = [];
  const queues: string[] = [];
  let log: CapturedLog;

  beforeAll(async () => {
    const database = testDatabases.find((d) => d.name === 'postgres') ?? testDatabases[0];
    dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
    connection = await connectAmqp(RABBITMQ_URL!);
    channel = await connection.createChannel();
  });
  afterAll(async () => {
    await Promise.all(apps.map((app) => app.close()));
    for (const queue of queues) await channel.deleteQueue(queue);
    await connection?.close();
    await dataSource?.destroy();
  });
  beforeEach(() => {
    settlements.length = 0;
    log = new CapturedLog();
  });
  afterEach(async () => {
    await Promise.all(apps.splice(0).map((app) => app.close()));
    for (const release of latches.values()) release();
    latches.clear();
  });

  /** A queue of the test's own, with a dead-letter queue, and `consumers` apps on it. */
  async function queueWith(
    consumers = 1,
    store: { dataSource: DataSource; storeTimeout?: string; lockTimeout?: string } = { dataSource },
  ) {
    const queue = `${tag}_${randomUUID().slice(0, 8)}`;
    const deadLetters = `${queue}_dead`;
    queues.push(queue, deadLetters);
    await channel.assertQueue(deadLetters, { durable: false });
    const queueOptions = {
      durable: false,
      arguments: { 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': deadLetters },
    };
    await channel.assertQueue(queue, queueOptions);
    const started: INestMicroservice[] = [];
    for (let i = 0; i < consumers; i++) {
      const app = await NestFactory.createMicroservice<MicroserviceOptions>(
        reviewModule(tag, store.dataSource, store),
        {
          transport: Transport.RMQ,
          options: { urls: [RABBITMQ_URL!], queue, noAck: false, prefetchCount: 4, queueOptions },
          logger: log,
        },
      );
      await app.listen();
      apps.push(app);
      started.push(app);
    }
    return {
      queue,
      apps: started,
      publish(handler: string, data: unknown, options: { messageId?: string; headers?: object }) {
        const packet = { pattern: `${tag}.${handler}`, data };
        channel.sendToQueue(queue, Buffer.from(JSON.stringify(packet)), options);
      },
      /** Closes the consumers (what they left unacknowledged goes back to the queue), then counts. */
      async leftOver() {
        await Promise.all(started.map((app) => app.close()));
        apps.splice(0, apps.length, ...apps.filter((app) => !started.includes(app)));
        const queued = (await channel.checkQueue(queue)).messageCount;
        const deadLettered = (await channel.checkQueue(deadLetters)).messageCount;
        return { queued, deadLettered };
      },
    };
  }

  const completedRecords = async (key: string) => {
    const rows: unknown[] = await dataSource.query(
      `SELECT 1 FROM idempotency_records WHERE idempotency_key = $1 AND state = 'completed'`,
      [key],
    );
    return rows.length;
  };
  const settledWith = (key: string) => settlements.filter((s) => s.key === key);
  const channelErrors = () =>
    log.lines.filter((line) => /PRECONDITION_FAILED|unknown delivery tag/i.test(line.text));

  it('two event handlers of one event (each with acknowledge): the message is acked once, the channel stays open', async () => {
    const rmq = await queueWith();
    const key = randomUUID();
    rmq.publish('fanout', {}, { messageId: key });
    await waitFor('both handlers to complete', async () =>
      (await completedRecords(key)) === 2 ? true : undefined,
    );
    // A message after it: delivered on the same channel, if the broker did not close it.
    const next = randomUUID();
    rmq.publish('book', {}, { messageId: next });
    await waitFor('the next message to be settled', () =>
      settledWith(next).length > 0 ? true : undefined,
    );
    expect(settledWith(key)).toEqual([{ key, settled: { kind: 'done', replayed: false } }]);
    expect(channelErrors()).toEqual([]);
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`fanout:trail|${key}`)).toBe(1);
    expect(runs.get(`fanout:mail|${key}`)).toBe(1);
  }, 30_000);

  it('two event handlers of one event, one crashing once: requeued once, the other not run again', async () => {
    const rmq = await queueWith();
    const key = randomUUID();
    rmq.publish('fanout', { crash: true }, { messageId: key });
    await waitFor('both handlers to complete', async () =>
      (await completedRecords(key)) === 2 ? true : undefined,
    );
    await waitFor('the redelivery to be settled', () =>
      settledWith(key).length === 2 ? true : undefined,
    );
    expect(settledWith(key).map((s) => s.settled.kind)).toEqual(['retry', 'done']);
    expect(channelErrors()).toEqual([]);
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`fanout:trail|${key}`)).toBe(1);
    expect(runs.get(`fanout:mail|${key}`)).toBe(2);
  }, 30_000);

  it('two handlers of one event, a message without a key (required: false), one failing first: requeued once, then acked', async () => {
    const rmq = await queueWith();
    const marker = randomUUID();
    rmq.publish('fanout-optional', { marker }, {});
    await waitFor('the redelivery to be settled', () =>
      settledWith(marker).length === 2 ? true : undefined,
    );
    expect(settledWith(marker).map((s) => s.settled.kind)).toEqual(['retry', 'done']);
    expect(channelErrors()).toEqual([]);
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    // Without a key nothing is idempotent: each ran on each delivery.
    expect(runs.get(`optional:slow|${marker}`)).toBe(2);
    expect(runs.get(`optional:crash|${marker}`)).toBe(2);
  }, 30_000);

  it('a 404 on a route whose policy releases it is a refusal: dead-lettered once, not requeued in a loop', async () => {
    const rmq = await queueWith();
    const key = randomUUID();
    rmq.publish('missing', {}, { messageId: key });
    await waitFor('the message to be settled', () =>
      settledWith(key).length > 0 ? true : undefined,
    );
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 1 });
    expect(settledWith(key).map((s) => s.settled.kind)).toEqual(['drop']);
    expect(runs.get(`missing|${key}`)).toBe(1);
  }, 30_000);

  it('an HttpException 404 from an event handler (stored by default): acked, a duplicate replays it without running', async () => {
    const rmq = await queueWith();
    const key = randomUUID();
    rmq.publish('not-found', {}, { messageId: key });
    await waitFor('the first to be settled', () => (settledWith(key).length ? true : undefined));
    rmq.publish('not-found', {}, { messageId: key });
    await waitFor('the duplicate to be settled', () =>
      settledWith(key).length === 2 ? true : undefined,
    );
    expect(settledWith(key).map((s) => s.settled)).toEqual([
      { kind: 'done', replayed: false },
      { kind: 'done', replayed: true },
    ]);
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`not-found|${key}`)).toBe(1);
  }, 30_000);

  it('an integer idempotency-key header (an AMQP typed header) is the key, over message_ids that differ', async () => {
    const rmq = await queueWith();
    const key = Math.floor(Math.random() * 2 ** 31);
    for (let i = 0; i < 2; i++)
      rmq.publish('book', {}, { messageId: randomUUID(), headers: { 'idempotency-key': key } });
    await waitFor('both copies to be settled', () =>
      settledWith(String(key)).length === 2 ? true : undefined,
    );
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`book|${key}`)).toBe(1);
  }, 30_000);

  it.each([
    ['big', 'more than maxResponseBytes'],
    ['big-tx', 'more than maxResponseBytes, transactional'],
    ['bigint', 'a BigInt, which no JSON holds'],
  ])(
    'an event handler (%s) that returns %s: done once, its duplicate dropped without running',
    async (handler) => {
      const rmq = await queueWith();
      const key = randomUUID();
      rmq.publish(handler, {}, { messageId: key });
      await waitFor('the first to be settled', () => (settledWith(key).length ? true : undefined));
      rmq.publish(handler, {}, { messageId: key });
      await waitFor('the duplicate to be settled', () =>
        settledWith(key).length === 2 ? true : undefined,
      );
      expect(settledWith(key).map((s) => s.settled)).toEqual([
        { kind: 'done', replayed: false },
        { kind: 'done', replayed: true },
      ]);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
      expect(runs.get(`${handler}|${key}`)).toBe(1);
    },
    30_000,
  );

  it('two consumers get one key at once (wait mode): the second waits, then is acked as a duplicate', async () => {
    const rmq = await queueWith(2);
    const key = randomUUID();
    rmq.publish('slow', {}, { messageId: key });
    await waitFor('the first to run', () => (latches.has(key) ? true : undefined));
    rmq.publish('slow', {}, { messageId: key });
    // The copy goes to the other consumer (round robin), which waits; nothing is settled yet.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(settledWith(key)).toEqual([]);
    latches.get(key)!();
    await waitFor('both copies to be settled', () =>
      settledWith(key).length === 2 ? true : undefined,
    );
    // The first done, the copy acked as its duplicate. In either order: the waiter hears of the
    // completion and reads it on its own connection while the first's completion statement answers
    // on another, and which the event loop settles first is not the library's to promise.
    const settled = settledWith(key).map((s) => s.settled);
    expect(settled).toHaveLength(2);
    expect(settled).toEqual(
      expect.arrayContaining([
        { kind: 'done', replayed: false },
        { kind: 'done', replayed: true },
      ]),
    );
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`slow|${key}`)).toBe(1);
  }, 30_000);

  it('two consumers get one key at once (reject mode): the second is requeued until the first is done, then acked', async () => {
    const rmq = await queueWith(2);
    const key = randomUUID();
    rmq.publish('slow-reject', {}, { messageId: key });
    await waitFor('the first to run', () => (latches.has(key) ? true : undefined));
    rmq.publish('slow-reject', {}, { messageId: key });
    await waitFor('the copy to be refused', () =>
      settledWith(key).some((s) => s.settled.kind === 'retry') ? true : undefined,
    );
    latches.get(key)!();
    await waitFor('the copy to be acked as a duplicate', () =>
      settledWith(key).some((s) => s.settled.kind === 'done' && s.settled.replayed)
        ? true
        : undefined,
    );
    const kinds = settledWith(key).map((s) => s.settled.kind);
    expect(kinds.filter((kind) => kind === 'done')).toHaveLength(2);
    expect(kinds.filter((kind) => kind === 'drop')).toHaveLength(0);
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`slow-reject|${key}`)).toBe(1);
  }, 30_000);

  it('the channel closes while the handler runs: the redelivery waits for it and is acked as a duplicate', async () => {
    const rmq = await queueWith();
    const key = randomUUID();
    rmq.publish('channel-lost', {}, { messageId: key });
    await waitFor('the first to run', () => (latches.has(key) ? true : undefined));
    // The broker puts the message back, and delivers it again once Nest has reconnected.
    await waitFor(
      'the consumer to be back on its queue',
      async () =>
        log.lines.some((line) => /Disconnected from RMQ/.test(line.text)) &&
        (await channel.checkQueue(rmq.queue)).consumerCount === 1
          ? true
          : undefined,
      { timeoutMs: 20_000, intervalMs: 100 },
    );
    latches.get(key)!();
    await waitFor('both deliveries to be settled', () =>
      settledWith(key).length === 2 ? true : undefined,
    );
    // The first delivery done, the redelivery acked as its duplicate. In either order: the waiting
    // redelivery reads the stored result on its own connection while the first's completion
    // answers on another, and which the event loop hears first is not the library's to fix.
    expect(settledWith(key).map((s) => s.settled)).toEqual(
      expect.arrayContaining([
        { kind: 'done', replayed: false },
        { kind: 'done', replayed: true },
      ]),
    );
    expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
    expect(runs.get(`channel-lost|${key}`)).toBe(1);
    // The first delivery's ack, on the closed channel, failed and was logged.
    expect(
      log.lines.some((line) => /The acknowledgement of a message .* failed/.test(line.text)),
    ).toBe(true);
  }, 30_000);

  const DATABASE_URL = process.env.DATABASE_URL;
  (DATABASE_URL ? it.each : it.skip.each)([
    ['cut', 'connections destroyed, new ones refused'],
    ['blackhole', 'connections held, nothing answered: storeTimeout'],
  ] as const)(
    'the store is unreachable (%s: %s): the message is requeued, not dropped, and runs once when it is back',
    async (outage, _description) => {
      const target = new URL(DATABASE_URL!);
      const proxy = await TcpProxy.start({ host: target.hostname, port: Number(target.port) });
      const proxied = new DataSource({
        type: 'postgres',
        url: proxy.proxiedUrl(DATABASE_URL!),
        entities: [IdempotencyRecord],
        extra: { connectionTimeoutMillis: 300 },
      });
      await proxied.initialize();
      try {
        const rmq = await queueWith(1, {
          dataSource: proxied,
          storeTimeout: '300ms',
          lockTimeout: '1s',
        });
        const before = randomUUID();
        rmq.publish('book', {}, { messageId: before });
        await waitFor('a message before the outage', () =>
          settledWith(before).length ? true : undefined,
        );
        if (outage === 'cut') await proxy.cut();
        else proxy.blackhole();
        const key = randomUUID();
        rmq.publish('book', {}, { messageId: key });
        await waitFor('the message to be requeued twice', () =>
          settledWith(key).filter((s) => s.settled.kind === 'retry').length >= 2 ? true : undefined,
        );
        await proxy.restore();
        await waitFor(
          'the message to be done',
          () => (settledWith(key).some((s) => s.settled.kind === 'done') ? true : undefined),
          { timeoutMs: 20_000 },
        );
        const kinds = settledWith(key).map((s) => s.settled);
        expect(kinds.at(-1)).toEqual({ kind: 'done', replayed: false });
        expect(kinds.slice(0, -1).every((s) => s.kind === 'retry')).toBe(true);
        expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
        expect(runs.get(`book|${key}`)).toBe(1);
      } finally {
        await proxy.restore();
        await proxied.destroy();
        await proxy.close();
      }
    },
    60_000,
  );

  (DATABASE_URL ? it : it.skip)(
    'the store goes down while a transactional handler runs: rolled back, requeued (not dropped), run again once it is back',
    async () => {
      const target = new URL(DATABASE_URL!);
      const proxy = await TcpProxy.start({ host: target.hostname, port: Number(target.port) });
      const proxied = new DataSource({
        type: 'postgres',
        url: proxy.proxiedUrl(DATABASE_URL!),
        entities: [IdempotencyRecord],
        extra: { connectionTimeoutMillis: 300 },
      });
      await proxied.initialize();
      try {
        const rmq = await queueWith(1, {
          dataSource: proxied,
          storeTimeout: '300ms',
          lockTimeout: '1s',
        });
        const key = randomUUID();
        rmq.publish('slow-tx', {}, { messageId: key });
        await waitFor('the handler to run', () => (latches.has(key) ? true : undefined));
        await proxy.cut();
        latches.get(key)!();
        // Its release cannot reach the store either: the key stays locked until lockTimeout (1 s).
        await waitFor('the message to be requeued', () =>
          settledWith(key).some((s) => s.settled.kind === 'retry') ? true : undefined,
        );
        expect(settledWith(key)[0].settled).toEqual({ kind: 'retry', reason: 'store-unavailable' });
        await proxy.restore();
        await waitFor(
          'the message to be done',
          () => (settledWith(key).some((s) => s.settled.kind === 'done') ? true : undefined),
          { timeoutMs: 20_000 },
        );
        expect(
          settledWith(key)
            .map((s) => s.settled.kind)
            .filter((k) => k !== 'retry'),
        ).toEqual(['done']);
        expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
        expect(runs.get(`slow-tx|${key}`)).toBe(2);
      } finally {
        await proxy.restore();
        await proxied.destroy();
        await proxy.close();
      }
    },
    60_000,
  );
});

describe('a hybrid app (HTTP and a TCP microservice, PGlite): one controller, both transports', () => {
  const tag = runTag('rvw');
  let app: INestApplication;
  let client: ClientProxy;
  let dataSource: DataSource;
  let baseUrl: string;

  beforeAll(async () => {
    const pglite = testDatabases.find((database) => database.name === 'pglite')!;
    dataSource = new DataSource({ ...pglite.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
    app = await NestFactory.create(reviewModule(tag, dataSource), { logger: new CapturedLog() });
    const microservice = app.connectMicroservice<MicroserviceOptions>({
      transport: Transport.TCP,
      options: { host: '127.0.0.1', port: 0 },
    });
    await app.startAllMicroservices();
    await app.listen(0, '127.0.0.1');
    baseUrl = `http://127.0.0.1:${(app.getHttpServer().address() as AddressInfo).port}`;
    const tcp = (
      microservice as unknown as { serverInstance: { server: { address(): AddressInfo } } }
    ).serverInstance.server.address();
    client = ClientProxyFactory.create({
      transport: Transport.TCP,
      options: { host: '127.0.0.1', port: tcp.port },
    });
    await client.connect();
  });
  afterAll(async () => {
    await client?.close();
    await app?.close();
    if (dataSource?.isInitialized) await dataSource.destroy();
  });
  beforeEach(() => {
    settlements.length = 0;
  });

  const replies = (pattern: unknown, payload: unknown) =>
    lastValueFrom(client.send(pattern, payload).pipe(toArray()));
  const failure = (pattern: string, payload: unknown) =>
    lastValueFrom(client.send(pattern, payload)).then(
      () => Promise.reject(new Error('the request succeeded')),
      (error: unknown) => error as Record<string, unknown>,
    );
  const endpointsOf = async (key: string) =>
    (
      (await dataSource.query(
        'SELECT endpoint FROM idempotency_records WHERE idempotency_key = $1 ORDER BY endpoint',
        [key],
      )) as { endpoint: string }[]
    ).map((row) => row.endpoint);

  it('the same handler on HTTP and on a message: each transport replays its own first answer', async () => {
    const key = randomUUID();
    const post = () =>
      fetch(`${baseUrl}/hybrid`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: JSON.stringify({ marker: `http-${key}`, amount: 5 }),
      });
    const first = await post();
    expect(first.status).toBe(201);
    const again = await post();
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(await again.json()).toEqual(await first.json());
    const message = { idempotencyKey: key, amount: 5 };
    const [reply] = await replies(`${tag}.hybrid`, message);
    expect(await replies(`${tag}.hybrid`, message)).toEqual([reply]);
    expect(runs.get(`hybrid|http-${key}`)).toBe(1);
    expect(runs.get(`hybrid|${key}`)).toBe(1);
    expect(await endpointsOf(key)).toEqual(['POST /hybrid', `RPC Hybrid.charge ${tag}.hybrid`]);
  });

  it('a handler that answers a Promise of undefined: the duplicate gets the same (empty) answer', async () => {
    const key = randomUUID();
    const first = await replies(`${tag}.nothing`, { idempotencyKey: key });
    expect(await replies(`${tag}.nothing`, { idempotencyKey: key })).toEqual(first);
    expect(runs.get(`nothing|${key}`)).toBe(1);
    expect(settlements.map((s) => s.settled)).toEqual([
      { kind: 'done', replayed: false },
      { kind: 'done', replayed: true },
    ]);
  });

  it('an Observable that emits, then fails with a final RpcException: the duplicate gets the same failure', async () => {
    const key = randomUUID();
    const first = await failure(`${tag}.half`, { idempotencyKey: key });
    expect(first).toMatchObject({ message: 'card declined' });
    expect(await failure(`${tag}.half`, { idempotencyKey: key })).toEqual(first);
    expect(runs.get(`half|${key}`)).toBe(1);
  });

  it('a pattern object sent with its keys in another order is the same handler and endpoint', async () => {
    const key = randomUUID();
    const message = { idempotencyKey: key, values: [1, 2, 3] };
    expect(await replies({ cmd: `${tag}.sum`, version: 2 }, message)).toEqual([6]);
    expect(await replies({ version: 2, cmd: `${tag}.sum` }, message)).toEqual([6]);
    expect(runs.get(`sum|${key}`)).toBe(1);
    expect(await endpointsOf(key)).toEqual([`RPC Handlers.sum [{"cmd":"${tag}.sum","version":2}]`]);
  });

  it.each([
    ['an empty key', ''],
    ['a key of spaces', '   '],
  ])(
    '%s in the payload is refused (key-invalid) and dropped, the handler not run',
    async (_name, key) => {
      expect(await failure(`${tag}.nothing`, { idempotencyKey: key })).toMatchObject({
        code: 'key-invalid',
        statusCode: 400,
      });
      expect(settlements.map((s) => s.settled.kind)).toEqual(['drop']);
      expect(runs.get(`nothing|${key}`)).toBeUndefined();
    },
  );
});
