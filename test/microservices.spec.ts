import { ClientProxyFactory, Transport, type ClientProxy } from '@nestjs/microservices';
import { connect as connectAmqp } from 'amqplib';
import { connectAsync as connectMqtt } from 'mqtt';
import { connect as connectNats, headers as natsHeaders } from '@nats-io/transport-node';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { firstValueFrom } from 'rxjs';
import { DataSource } from 'typeorm';
import { transportKey } from '../lib/index.js';
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
