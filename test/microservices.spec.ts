import type { INestMicroservice } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  ClientProxyFactory,
  Transport,
  type ClientProxy,
  type MicroserviceOptions,
} from '@nestjs/microservices';
import { connect as connectAmqp } from 'amqplib';
import { connectAsync as connectMqtt } from 'mqtt';
import { connect as connectNats, headers as natsHeaders } from '@nats-io/transport-node';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { firstValueFrom, lastValueFrom, toArray } from 'rxjs';
import { DataSource } from 'typeorm';
import { IdempotencyRecord, transportKey } from '../lib/index.js';
import { messageHandlersModule, runs, settlements } from './fixtures/message-handlers.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases } from './support/databases.js';
import { createEffectsTables, dropEffectsTables } from './support/effects.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { describeOnPostgres, report, runTag, tally, waitFor } from './support/reliability.js';

/** Each broker's tests run when its URL is set (`.ci/run` sets them all). */
const BROKERS = {
  rmq: process.env.RABBITMQ_URL,
  nats: process.env.NATS_URL,
  mqtt: process.env.MQTT_URL,
  redis: process.env.REDIS_URL,
};
const describeWith = (url: string | undefined, name: string) =>
  (url ? describe : describe.skip).bind(null, `${name}${url ? '' : ' (set its URL to run)'}`);

/** A free TCP port of 127.0.0.1, for the TCP transport's server. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

describeOnPostgres('message handlers on real brokers', (url) => {
  const tag = runTag('rpc');
  let db: DataSource;
  const processes: AppProcess[] = [];

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
    await createEffectsTables(db, tag);
  });
  afterAll(async () => {
    await Promise.all(processes.map((p) => p.stop('SIGKILL')));
    if (db?.isInitialized) {
      await dropEffectsTables(db, tag);
      await db.query('DELETE FROM idempotency_records WHERE scope = $1', [tag]);
      await db.destroy();
    }
  });

  async function consumer(
    transport: string,
    env: Record<string, string> = {},
  ): Promise<AppProcess> {
    const started = await startAppProcess('test/fixtures/rpc-server.js', {
      TRANSPORT: transport,
      DATABASE_URL: url,
      EFFECTS_TABLE: tag,
      TAG: tag,
      ...env,
    });
    processes.push(started);
    return started;
  }

  const effectsOf = async (keys: string[]) => {
    const rows: { idempotency_key: string; pid: number }[] = await db.query(
      `SELECT idempotency_key, pid FROM ${tag} WHERE idempotency_key = ANY($1)`,
      [keys],
    );
    return (key: string) => rows.filter((row) => row.idempotency_key === key);
  };

  /** Waits until every key has at least one effect, then returns the effects per key. */
  const settledEffects = async (keys: string[]) =>
    waitFor(
      'every message to be handled',
      async () => {
        const of = await effectsOf(keys);
        return keys.every((key) => of(key).length > 0) ? of : undefined;
      },
      { timeoutMs: 30_000, intervalMs: 100 },
    );

  /** Waits until every key's record is completed: the firsts ran, the duplicates can only replay. */
  const allCompleted = (keys: string[]) =>
    waitFor('every record to be completed', async () => {
      const [{ n }]: { n: number }[] = await db.query(
        `SELECT count(*)::int AS n FROM idempotency_records WHERE scope = $1 AND idempotency_key = ANY($2) AND state = 'completed'`,
        [tag, keys],
      );
      return n === keys.length ? true : undefined;
    });

  describeWith(
    BROKERS.rmq,
    'RabbitMQ (manual acknowledgement)',
  )(() => {
    const publish = async (queue: string, keys: string[]) => {
      const connection = await connectAmqp(BROKERS.rmq!);
      const channel = await connection.createChannel();
      await channel.assertQueue(queue, { durable: false });
      for (const key of keys) {
        // Nest's packet; the message's message_id is the key.
        channel.sendToQueue(
          queue,
          Buffer.from(JSON.stringify({ pattern: `${tag}.book`, data: { amount: 3 } })),
          { messageId: key },
        );
      }
      await channel.close();
      await connection.close();
    };

    it.each([
      [
        'before-ack',
        'after its result committed, before the ack: the redelivery is a duplicate, acknowledged without running',
      ],
      [
        'before-commit',
        'after its write, before the commit: the write is rolled back, and the redelivery runs once',
      ],
    ])(
      'a consumer SIGKILLed %s — %s',
      async (hangAt) => {
        const queue = `${tag}_${hangAt}`;
        const keys = Array.from({ length: 4 }, () => randomUUID());
        const doomed = await consumer('rmq', {
          BROKER_URL: BROKERS.rmq!,
          QUEUE: queue,
          HANG_AT: hangAt,
        });
        await publish(queue, keys);
        const reached = hangAt === 'before-ack' ? 'committed' : 'booked';
        for (const key of keys) await doomed.waitForOutput(new RegExp(`${reached} ${key}`), 20_000);
        const survivors = await Promise.all([
          consumer('rmq', { BROKER_URL: BROKERS.rmq!, QUEUE: queue }),
          consumer('rmq', { BROKER_URL: BROKERS.rmq!, QUEUE: queue }),
        ]);
        await doomed.stop('SIGKILL');
        // The broker gives the unacknowledged messages to the survivors; each is settled `done`.
        for (const key of keys) {
          await Promise.any(
            survivors.map((s) => s.waitForOutput(new RegExp(`settled done.* ${key}`), 20_000)),
          );
        }
        const effects = await settledEffects(keys);
        const doomedPid = doomed.child.pid;
        for (const key of keys) {
          expect(effects(key)).toHaveLength(1);
          if (hangAt === 'before-ack') expect(effects(key)[0].pid).toBe(doomedPid);
          else expect(effects(key)[0].pid).not.toBe(doomedPid);
        }
        const replays = survivors
          .map((s) => (s.output().match(/settled done replayed/g) ?? []).length)
          .reduce((a, b) => a + b, 0);
        report(`RabbitMQ: consumer killed ${hangAt}, ${keys.length} messages, 2 survivors`, {
          'effects per message': keys.map((key) => effects(key).length).join(', '),
          'redeliveries acknowledged as duplicates (not run)': replays,
        });
      },
      90_000,
    );
  });

  describeWith(
    BROKERS.rmq,
    'RabbitMQ: every message settled once (manual acknowledgement, a dead-letter queue)',
  )(() => {
    /** Stops the test's consumer and deletes its queues, even when the test failed midway. */
    let cleanUp: (() => Promise<void>) | undefined;
    afterEach(async () => {
      await cleanUp?.();
      cleanUp = undefined;
    });

    /** A consumer on a queue of its own, whose dead letters (`drop`) go to a second queue. */
    async function settlingConsumer() {
      const queue = `${tag}_${randomUUID().slice(0, 8)}`;
      const deadLetters = `${queue}_dead`;
      const connection = await connectAmqp(BROKERS.rmq!);
      const channel = await connection.createChannel();
      await channel.assertQueue(deadLetters, { durable: false });
      await channel.assertQueue(queue, {
        durable: false,
        arguments: { 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': deadLetters },
      });
      const app = await consumer('rmq', {
        BROKER_URL: BROKERS.rmq!,
        QUEUE: queue,
        DEAD_LETTER_QUEUE: deadLetters,
      });
      cleanUp = async () => {
        await app.stop('SIGKILL');
        await channel.deleteQueue(queue);
        await channel.deleteQueue(deadLetters);
        await connection.close();
      };
      const count = (pattern: string) =>
        (app.output().match(new RegExp(pattern, 'g')) ?? []).length;
      return {
        app,
        publish(
          handler: string,
          data: unknown,
          options: { messageId?: string; headers?: object } = {},
        ) {
          const packet = { pattern: `${tag}.${handler}`, data };
          channel.sendToQueue(queue, Buffer.from(JSON.stringify(packet)), options);
        },
        /** How often the consumer settled a message with this key (or marker), and ran a handler for it. */
        settledCount: (id: string) => count(`settled \\w+( replayed)? ${id}`),
        ranCount: (id: string) => count(`ran \\w+ ${id}`),
        /**
         * Stops the consumer (the broker puts what it left unacknowledged back in the queue), then
         * counts the messages left in the queue and those dead-lettered.
         */
        async leftOver() {
          await app.stop();
          await waitFor('the consumer to be gone from its queue', async () =>
            (await channel.checkQueue(queue)).consumerCount === 0 ? true : undefined,
          );
          const queued = (await channel.checkQueue(queue)).messageCount;
          const deadLettered = (await channel.checkQueue(deadLetters)).messageCount;
          return { queued, deadLettered };
        },
      };
    }

    it('a deliberate RpcException (no statusCode) is acked once, not redelivered in a loop; a duplicate replays it', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      rmq.publish('refuse', { amount: 1 }, { messageId: key });
      await rmq.app.waitForOutput(new RegExp(`settled done ${key}`), 20_000);
      rmq.publish('refuse', { amount: 1 }, { messageId: key });
      await rmq.app.waitForOutput(new RegExp(`settled done replayed ${key}`), 20_000);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
      expect(rmq.ranCount(key)).toBe(1);
      expect(rmq.settledCount(key)).toBe(2);
    }, 60_000);

    it('a payload the ValidationPipe refuses (400) is dead-lettered once, not redelivered', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      rmq.publish('validated', { amount: 'ten' }, { messageId: key });
      await rmq.app.waitForOutput(new RegExp(`settled drop ${key}`), 20_000);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 1 });
      expect(rmq.settledCount(key)).toBe(1);
    }, 60_000);

    it('a crash is requeued and runs again: the redelivery succeeds and is acked', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      rmq.publish('flaky', {}, { messageId: key });
      await rmq.app.waitForOutput(
        new RegExp(`settled retry ${key}[^]*settled done ${key}`),
        20_000,
      );
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
      expect(rmq.ranCount(key)).toBe(2);
    }, 60_000);

    it('a message without a key on a required: false route is acked after it ran', async () => {
      const rmq = await settlingConsumer();
      const marker = randomUUID();
      rmq.publish('optional', { marker });
      await rmq.app.waitForOutput(new RegExp(`ran optional ${marker}`), 20_000);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
      expect(rmq.settledCount(marker)).toBe(1);
    }, 60_000);

    it('a message its scope resolver refuses, and one without a key on a required route, are dead-lettered', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      const marker = randomUUID();
      rmq.publish('tenant', {}, { messageId: key });
      rmq.publish('book', { marker });
      await rmq.app.waitForOutput(new RegExp(`settled drop ${key}`), 20_000);
      await rmq.app.waitForOutput(new RegExp(`settled drop ${marker}`), 20_000);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 2 });
      expect(rmq.ranCount(key)).toBe(0);
    }, 60_000);

    it('the key in an Idempotency-Key header wins over a message_id that differs per copy', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      const copies = [randomUUID(), randomUUID()];
      for (const messageId of copies)
        rmq.publish('book', { amount: 2 }, { messageId, headers: { 'Idempotency-Key': key } });
      await waitFor(
        'both copies to be settled',
        () => (rmq.settledCount(key) === 2 ? true : undefined),
        {
          timeoutMs: 20_000,
        },
      );
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 0 });
      const effects = await effectsOf([key, ...copies]);
      expect(effects(key)).toHaveLength(1);
    }, 60_000);

    it('a text payload is fingerprinted as sent: its copy replays, another text under its key is dead-lettered', async () => {
      const rmq = await settlingConsumer();
      const key = randomUUID();
      rmq.publish('book', 'transfer 10 to savings', { messageId: key });
      rmq.publish('book', 'transfer 10 to savings', { messageId: key });
      await rmq.app.waitForOutput(new RegExp(`settled done replayed ${key}`), 20_000);
      rmq.publish('book', 'transfer 99 to savings', { messageId: key });
      await rmq.app.waitForOutput(new RegExp(`settled drop ${key}`), 20_000);
      expect(await rmq.leftOver()).toEqual({ queued: 0, deadLettered: 1 });
      expect((await effectsOf([key]))(key)).toHaveLength(1);
    }, 60_000);
  });

  describeWith(
    BROKERS.nats,
    'NATS (queue group of three)',
  )(() => {
    it('the publisher sends every message twice (same Nats-Msg-Id): each is handled once', async () => {
      const queue = `${tag}_nats`;
      await Promise.all(
        [0, 1, 2].map(() => consumer('nats', { BROKER_URL: BROKERS.nats!, QUEUE: queue })),
      );
      const keys = Array.from({ length: 30 }, () => randomUUID());
      const nc = await connectNats({ servers: BROKERS.nats! });
      for (const key of keys) {
        const h = natsHeaders();
        h.set('Nats-Msg-Id', key);
        const packet = JSON.stringify({ pattern: `${tag}.book`, data: { amount: 5 } });
        nc.publish(`${tag}.book`, packet, { headers: h });
        nc.publish(`${tag}.book`, packet, { headers: h });
      }
      await nc.flush();
      await nc.close();
      const effects = await settledEffects(keys);
      // Give the second copies time to arrive and be dropped: they are in flight together with the firsts.
      await allCompleted(keys);
      const after = await effectsOf(keys);
      for (const key of keys) expect(after(key)).toHaveLength(1);
      report('NATS: 3 consumers in a queue group, every message published twice', {
        messages: keys.length,
        'effects per message': JSON.stringify(tally(keys.map((key) => effects(key).length))),
      });
    }, 60_000);
  });

  describeWith(
    BROKERS.mqtt,
    'MQTT 5 (QoS 1, user property idempotency-key)',
  )(() => {
    it('a message delivered twice is handled once', async () => {
      await consumer('mqtt', { BROKER_URL: BROKERS.mqtt! });
      const keys = Array.from({ length: 10 }, () => randomUUID());
      const client = await connectMqtt(BROKERS.mqtt!, { protocolVersion: 5 });
      for (const key of keys) {
        const packet = JSON.stringify({ pattern: `${tag}.book`, data: { amount: 7 } });
        const options = {
          qos: 1 as const,
          properties: { userProperties: { 'idempotency-key': key } },
        };
        await client.publishAsync(`${tag}.book`, packet, options);
        await client.publishAsync(`${tag}.book`, packet, { ...options, dup: true });
      }
      await client.endAsync();
      await settledEffects(keys);
      await allCompleted(keys);
      const effects = await effectsOf(keys);
      for (const key of keys) expect(effects(key)).toHaveLength(1);
    }, 60_000);
  });

  /** Request-response: duplicates at once and after, from one client; every reply is the first one. */
  async function requestResponse(client: ClientProxy) {
    await client.connect();
    const keys = Array.from({ length: 10 }, () => randomUUID());
    const replies = await Promise.all(
      keys.flatMap((key) =>
        [0, 1, 2].map(() =>
          firstValueFrom(client.send(`${tag}.charge`, { idempotencyKey: key, amount: 9 })),
        ),
      ),
    );
    const later = await Promise.all(
      keys.map((key) =>
        firstValueFrom(client.send(`${tag}.charge`, { idempotencyKey: key, amount: 9 })),
      ),
    );
    const effects = await effectsOf(keys);
    keys.forEach((key, i) => {
      expect(effects(key)).toHaveLength(1);
      const ofKey = replies.slice(i * 3, i * 3 + 3);
      for (const reply of [...ofKey, later[i]])
        expect(reply).toEqual({ effect: expect.any(Number), pid: effects(key)[0].pid });
      expect(new Set([...ofKey, later[i]].map((reply) => reply.effect)).size).toBe(1);
    });
    // Another payload under a used key: a key-reused RpcException, the handler not run.
    await expect(
      firstValueFrom(client.send(`${tag}.charge`, { idempotencyKey: keys[0], amount: 10 })),
    ).rejects.toMatchObject({
      code: 'key-reused',
      statusCode: 422,
    });
    expect((await effectsOf(keys))(keys[0])).toHaveLength(1);
    await client.close();
  }

  describeWith(
    BROKERS.redis,
    'Redis (two servers both receive every request)',
  )(() => {
    it('duplicates get the first reply, the handler runs once per key', async () => {
      await Promise.all([0, 1].map(() => consumer('redis', { BROKER_URL: BROKERS.redis! })));
      const { hostname, port } = new URL(BROKERS.redis!);
      await requestResponse(
        ClientProxyFactory.create({
          transport: Transport.REDIS,
          options: { host: hostname, port: Number(port) },
        }),
      );
    }, 60_000);
  });

  describe('TCP', () => {
    it('duplicates get the first reply, the handler runs once per key', async () => {
      const port = await freePort();
      await consumer('tcp', { PORT: String(port) });
      await requestResponse(
        ClientProxyFactory.create({
          transport: Transport.TCP,
          options: { host: '127.0.0.1', port },
        }),
      );
    }, 60_000);
  });
});

describe('message handlers in one process (TCP, PGlite): settling, endpoints, replies', () => {
  let app: INestMicroservice;
  let client: ClientProxy;
  let dataSource: DataSource;
  const log = new CapturedLog();

  beforeAll(async () => {
    const pglite = testDatabases.find((database) => database.name === 'pglite')!;
    dataSource = new DataSource({ ...pglite.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
    const port = await freePort();
    app = await NestFactory.createMicroservice<MicroserviceOptions>(
      messageHandlersModule(dataSource),
      { transport: Transport.TCP, options: { host: '127.0.0.1', port }, logger: log },
    );
    await app.listen();
    client = ClientProxyFactory.create({
      transport: Transport.TCP,
      options: { host: '127.0.0.1', port },
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

  /** Every reply of one request (Nest streams several when the handler returns several). */
  const replies = (pattern: string, payload: unknown) =>
    lastValueFrom(client.send(pattern, payload).pipe(toArray()));
  /** The error object a request fails with. */
  const failure = (pattern: string, payload: unknown) =>
    lastValueFrom(client.send(pattern, payload)).then(
      () => Promise.reject(new Error('the request succeeded')),
      (error: unknown) => error as Record<string, unknown>,
    );
  const done = (replayed: boolean) => ({ kind: 'done', replayed });
  const settledOf = (pattern: string) =>
    settlements.filter((s) => s.pattern === pattern).map((s) => s.settled);
  const recordsOf = (key: string): Promise<{ endpoint: string; responseStatus: number }[]> =>
    dataSource.query(
      'SELECT endpoint, response_status AS "responseStatus" FROM idempotency_records WHERE idempotency_key = $1',
      [key],
    );

  it('an RpcException without a statusCode is a final answer: stored, replayed, settled done', async () => {
    const key = randomUUID();
    const first = await failure('refuse', { idempotencyKey: key });
    const again = await failure('refuse', { idempotencyKey: key });
    expect(first).toMatchObject({ message: 'insufficient funds' });
    expect(again).toEqual(first);
    expect(runs.get(`refuse|${key}`)).toBe(1);
    expect(settledOf('refuse')).toEqual([done(false), done(true)]);
  });

  it('an RpcException with a 5xx statusCode is released and settled retry: a redelivery runs again', async () => {
    const key = randomUUID();
    await failure('unavailable', { idempotencyKey: key });
    await failure('unavailable', { idempotencyKey: key });
    expect(runs.get(`unavailable|${key}`)).toBe(2);
    expect(settledOf('unavailable').map((s) => s.kind)).toEqual(['retry', 'retry']);
    expect(await recordsOf(key)).toHaveLength(0);
  });

  it('a crash is released and settled retry', async () => {
    const key = randomUUID();
    await failure('crash', { idempotencyKey: key });
    expect(settledOf('crash').map((s) => s.kind)).toEqual(['retry']);
    expect(await recordsOf(key)).toHaveLength(0);
  });

  it('a payload the ValidationPipe refuses (400) is released and dropped: redelivering it cannot help', async () => {
    const key = randomUUID();
    await failure('validated', { idempotencyKey: key, amount: 'ten' });
    expect(settledOf('validated')).toEqual([{ kind: 'drop', reason: expect.any(String) }]);
    expect(await recordsOf(key)).toHaveLength(0);
    // The key was released: the corrected payload under the same key runs.
    expect(await replies('validated', { idempotencyKey: key, amount: 10 })).toEqual([
      { amount: 10 },
    ]);
    expect(settledOf('validated')[1]).toEqual(done(false));
  });

  it('a message without a key on a required: false route is settled once: done, or by the error rules', async () => {
    const marker = randomUUID();
    expect(await replies('optional', { marker })).toEqual(['ok']);
    expect(settledOf('optional')).toEqual([done(false)]);
    await failure('optional', { marker, fail: true });
    expect(settledOf('optional')).toEqual([
      done(false),
      { kind: 'drop', reason: expect.any(String) },
    ]);
    expect(runs.get(`optional|${marker}`)).toBe(2);
  });

  it('a missing key on a required route is rejected and dropped, the handler not run', async () => {
    const marker = randomUUID();
    expect(await failure('required', { marker })).toMatchObject({
      code: 'key-missing',
      statusCode: 400,
    });
    expect(settledOf('required')).toEqual([{ kind: 'drop', reason: 'key-missing' }]);
    expect(runs.get(`required|${marker}`)).toBeUndefined();
  });

  it('a scope resolver that throws settles the message once: a 403 is dropped, a crash retried', async () => {
    const key = randomUUID();
    await failure('tenant', { idempotencyKey: key });
    await failure('tenant', { idempotencyKey: key, tenant: 'crash' });
    expect(settledOf('tenant').map((s) => s.kind)).toEqual(['drop', 'retry']);
    expect(runs.get(`tenant|${key}`)).toBeUndefined();
  });

  it('an acknowledgement that throws is called once and does not change the reply', async () => {
    const key = randomUUID();
    expect(await replies('ack-fails', { idempotencyKey: key })).toEqual([{ charged: true }]);
    expect(settledOf('ack-fails')).toEqual([done(false)]);
    expect(log.lines.some((line) => /Channel closed/.test(line.text))).toBe(true);
  });

  it('two handlers of one class name and method name, on two patterns, keep their keys apart', async () => {
    const key = randomUUID();
    expect(await replies('ledger.a', { idempotencyKey: key })).toEqual([{ ledger: 'ledger.a' }]);
    expect(await replies('ledger.b', { idempotencyKey: key })).toEqual([{ ledger: 'ledger.b' }]);
    expect(await failure('ledger.b', { idempotencyKey: key, other: true })).toMatchObject({
      code: 'key-reused',
    });
    expect(runs.get(`ledger.a|${key}`)).toBe(1);
    expect(runs.get(`ledger.b|${key}`)).toBe(1);
    expect((await recordsOf(key)).map((r) => r.endpoint).sort()).toEqual([
      'RPC Ledger.handle ledger.a',
      'RPC Ledger.handle ledger.b',
    ]);
  });

  it('two event handlers of one event each process a message once', async () => {
    const key = randomUUID();
    for (let i = 0; i < 3; i++)
      await lastValueFrom(client.emit('audited', { idempotencyKey: key }));
    await waitFor('both handlers to finish', async () =>
      (await recordsOf(key)).length === 2 ? true : undefined,
    );
    expect(runs.get(`audited:trail|${key}`)).toBe(1);
    expect(runs.get(`audited:mail|${key}`)).toBe(1);
  });

  it('two handlers alike in class name, method name and event share one key space: warned', async () => {
    const key = randomUUID();
    await lastValueFrom(client.emit('lookalike', { idempotencyKey: key }));
    await waitFor('the warning', () =>
      log.lines.some(
        (line) =>
          line.level === 'warn' &&
          line.text.includes(
            'Two message handlers share the endpoint "RPC Lookalike.handle lookalike"',
          ),
      )
        ? true
        : undefined,
    );
  });

  it('a handler that replies several values: the first caller and a replay get all of them', async () => {
    const key = randomUUID();
    const parts = [{ part: 1 }, { part: 2 }, { part: 3 }];
    expect(await replies('stream', { idempotencyKey: key })).toEqual(parts);
    expect(await replies('stream', { idempotencyKey: key })).toEqual(parts);
    expect(runs.get(`stream|${key}`)).toBe(1);
  });

  it('a numeric key field is a key (an event id from a sequence)', async () => {
    const key = Math.floor(Math.random() * 2 ** 40);
    const first = await replies('echo', { idempotencyKey: key });
    expect(await replies('echo', { idempotencyKey: key })).toEqual(first);
    expect(runs.get(`echo|${key}`)).toBe(1);
    expect(await failure('echo', { idempotencyKey: 1.5 })).toMatchObject({ code: 'key-invalid' });
  });

  it.each([
    ['a string', 'hello'],
    ['a number', 42],
    ['an array', [1, 2]],
  ])('%s payload without a key is a key-missing refusal, not a crash', async (_name, payload) => {
    expect(await failure('echo', payload)).toMatchObject({ code: 'key-missing', statusCode: 400 });
  });
});

describe('Kafka (no broker on this machine: a KafkaContext as the transport builds it)', () => {
  const kafkaContext = (message: object) => ({
    getMessage: () => message,
    getPartition: () => 2,
    getTopic: () => 'payments',
  });

  it('reads the idempotency-key header (a Buffer, as kafkajs delivers headers)', () => {
    expect(
      transportKey(
        kafkaContext({ offset: '41', headers: { 'idempotency-key': Buffer.from('k-123') } }),
      ),
    ).toBe('k-123');
  });

  it('falls back to topic/partition/offset: the same on every redelivery of the message', () => {
    expect(transportKey(kafkaContext({ offset: '41', headers: {} }))).toBe('payments/2/41');
  });
});
