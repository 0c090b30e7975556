import { connect as connectAmqp } from 'amqplib';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HttpClient, isReplay, jsonOf } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { waitFor } from './support/reliability.js';

const rabbitmqUrl = process.env.RABBITMQ_URL;

/**
 * The sample as a hybrid app (`node dist/sample/main.js` with RABBITMQ_URL): POST /transfers/async
 * queues a transfer command on RabbitMQ; the consumer in the same process executes it once, however
 * often it is delivered.
 */
(rabbitmqUrl ? describe : describe.skip)('the sample’s queued transfers on RabbitMQ', () => {
  let dataDir: string;
  let shop: AppProcess;
  let client: HttpClient;

  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-queue-'));
    shop = await startAppProcess(
      'sample/main.js',
      {
        DATABASE_URL: '',
        SAMPLE_DATA_DIR: dataDir,
        PORT: '0',
        RABBITMQ_URL: rabbitmqUrl!,
        GATEWAY_LATENCY_MS: '10',
      },
      /Listening on http:\/\/localhost:(\d+)/,
    );
    client = new HttpClient(shop.baseUrl, 4);
  }, 60_000);
  afterAll(async () => {
    client?.close();
    await shop?.stop();
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(`${dataDir}.lock`, { force: true });
  });

  const get = async (path: string) => (await client.send(path, { method: 'GET' })).text;
  const counter = async (outcome: string) =>
    Number(
      new RegExp(`idempotency_requests_total\\{outcome="${outcome}"\\} (\\d+)`).exec(
        await get('/metrics'),
      )?.[1] ?? 0,
    );
  const aliceBalance = async () => Number(JSON.parse(await get('/accounts/acc_alice')).balance);

  it('a retried request and a command delivered twice move the money once', async () => {
    const before = {
      balance: await aliceBalance(),
      executed: await counter('executed'),
      replayed: await counter('replayed'),
    };
    const key = randomUUID();
    const transfer = { from_account: 'acc_alice', to_account: 'acc_bob', amount: 25 };
    const queued = await client.post('/transfers/async', key, transfer);
    expect(queued.status).toBe(202);
    const retry = await client.post('/transfers/async', key, transfer);
    expect(isReplay(retry)).toBe(true);
    const { command_key: commandKey } = jsonOf(queued);

    // The command once more, as a broker redelivers it (or a publisher retries).
    const connection = await connectAmqp(rabbitmqUrl!);
    const channel = await connection.createChannel();
    const command = {
      fromAccount: 'acc_alice',
      toAccount: 'acc_bob',
      amount: 25,
      idempotencyKey: commandKey,
    };
    channel.sendToQueue(
      'sample_transfers',
      Buffer.from(JSON.stringify({ pattern: 'transfers.execute', data: command })),
    );
    await channel.close();
    await connection.close();

    // The request and the command each ran once; the HTTP retry and the second delivery replayed.
    await waitFor(
      'both deliveries to be settled',
      async () =>
        (await counter('executed')) === before.executed + 2 &&
        (await counter('replayed')) === before.replayed + 2
          ? true
          : undefined,
      { timeoutMs: 20_000, intervalMs: 100 },
    );
    expect(before.balance - (await aliceBalance())).toBe(25);
  }, 60_000);
});
