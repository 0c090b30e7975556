import { randomInt, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { signWebhook } from '../sample/gateway/gateway-webhook.sender.js';
import { HttpClient, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { waitFor } from './support/reliability.js';

/** The sample's default secret: the gateway signs with it, and so does this test as a sender. */
const SECRET = 'whsec_sample_shop_gateway_secret';

interface SentCopy {
  copy: string;
  status: number;
  replayed: boolean;
  response: string;
}
interface GatewayEvent {
  id: string;
  object_id: string;
  delivered_at: string | null;
  copies: SentCopy[];
}
interface ReceivedEvent {
  event_id: string;
  object_id: string;
  handler_runs: number;
}

/** Where the shop keeps its rows: a PGlite folder of the test's own, or the PostgreSQL server. */
const databases: [string, (dataDir: string) => Record<string, string>][] = [
  ['PGlite', (dataDir) => ({ DATABASE_URL: '', SAMPLE_DATA_DIR: dataDir })],
  ...(process.env.DATABASE_URL
    ? [
        ['PostgreSQL', () => ({ DATABASE_URL: process.env.DATABASE_URL! })] as [
          string,
          () => Record<string, string>,
        ],
      ]
    : []),
];

/**
 * The sample shop as `npm start` runs it (`node dist/sample/main.js`): its simulated gateway sends
 * each charge's `charge.succeeded` event to the shop's `POST /webhooks/gateway` at least once (two
 * copies at once, a late one, retries on any non-2xx); here the test is also a sender of its own.
 * What a sender sees (every copy a 2xx, each the first answer) and what the shop's table holds
 * (each event once, its handler run once), on PGlite and PostgreSQL.
 */
describe.each(databases)('the sample’s gateway webhooks on %s (real processes)', (_name, envOf) => {
  const shops: AppProcess[] = [];
  const clients: HttpClient[] = [];
  const dataDirs: string[] = [];

  async function startShop(dataDir: string, env: Record<string, string> = {}) {
    const shop = await startAppProcess(
      'sample/main.js',
      {
        ...envOf(dataDir),
        PORT: '0',
        IDEMPOTENCY_LOCK_TIMEOUT: '1s',
        GATEWAY_LATENCY_MS: '10',
        ...env,
      },
      /Listening on http:\/\/localhost:(\d+)/,
    );
    const client = new HttpClient(shop.baseUrl, 16);
    shops.push(shop);
    clients.push(client);
    return { shop, client };
  }
  const newDataDir = () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-webhooks-'));
    dataDirs.push(dataDir);
    return dataDir;
  };
  const stopAll = async () => {
    clients.splice(0).forEach((client) => client.close());
    await Promise.all(shops.splice(0).map((shop) => shop.stop('SIGKILL')));
  };
  afterAll(async () => {
    await stopAll();
    for (const dataDir of dataDirs.splice(0)) {
      rmSync(dataDir, { recursive: true, force: true });
      rmSync(`${dataDir}.lock`, { force: true });
    }
  });

  const get = async <T>(client: HttpClient, path: string): Promise<T> =>
    jsonOf(await client.send(path, { method: 'GET' })) as T;

  /** A charge.succeeded event as the gateway shapes it, for the test to send itself. */
  const eventBody = () => {
    const id = `evt_test_${randomUUID()}`;
    const body = JSON.stringify({
      id,
      object: 'event',
      type: 'charge.succeeded',
      created: Math.floor(Date.now() / 1000),
      data: { object: { id: `ch_test_${randomUUID()}`, amount: 1200, currency: 'eur' } },
    });
    return { id, body };
  };
  const deliver = (client: HttpClient, body: string, signature = signWebhook(body, SECRET)) =>
    client.send('/webhooks/gateway', {
      body,
      headers: { 'Content-Type': 'application/json', 'Stripe-Signature': signature },
    });

  const receivedOf = async (client: HttpClient, ids: string[]) =>
    (await get<ReceivedEvent[]>(client, '/webhooks/gateway/events')).filter((event) =>
      ids.includes(event.event_id),
    );

  describe('one shop', () => {
    let client: HttpClient;
    let shop: AppProcess;
    beforeAll(async () => {
      // Long enough a handler that copies sent at once overlap it.
      ({ shop, client } = await startShop(newDataDir(), { WEBHOOK_HANDLER_LATENCY_MS: '1500' }));
    }, 120_000);
    afterAll(stopAll);

    it('every copy the gateway sends of each charge’s event gets a 2xx and the first answer; the shop records each event once', async () => {
      const amounts = [0, 1, 2].map(() => randomInt(10_000_000, 100_000_000));
      const paid = await Promise.all(
        amounts.map((amount) =>
          client.post('/payments', randomUUID(), { amount, currency: 'eur', source: 'tok_visa' }),
        ),
      );
      expect(paid.map((answer) => answer.status)).toEqual([201, 201, 201]);
      const charges = (
        await get<{ id: string; amount: number }[]>(client, '/gateway/charges')
      ).filter((charge) => amounts.includes(charge.amount));
      expect(charges).toHaveLength(3);
      const chargeIds = charges.map((charge) => charge.id);

      // Delivered, and the late duplicate sent too: three copies of each event.
      const events = await waitFor(
        'every event delivered, late duplicates included',
        async () => {
          const ours = (await get<GatewayEvent[]>(client, '/gateway/webhooks')).filter((event) =>
            chargeIds.includes(event.object_id),
          );
          return ours.length === 3 &&
            ours.every((event) => event.delivered_at && event.copies.length >= 3)
            ? ours
            : undefined;
        },
        { timeoutMs: 30_000, intervalMs: 200 },
      );
      for (const event of events) {
        expect(event.copies.map((copy) => copy.copy).sort()).toEqual([
          'concurrent',
          'first',
          'late-duplicate',
        ]);
        expect(event.copies.map((copy) => copy.status)).toEqual([200, 200, 200]);
        // One copy ran the handler; the others got its answer, byte for byte.
        expect(event.copies.filter((copy) => !copy.replayed)).toHaveLength(1);
        expect(new Set(event.copies.map((copy) => copy.response)).size).toBe(1);
        expect(JSON.parse(event.copies[0].response)).toMatchObject({
          received: true,
          event_id: event.id,
        });
      }

      const received = await receivedOf(
        client,
        events.map((event) => event.id),
      );
      expect(received.map((event) => event.object_id).sort()).toEqual([...chargeIds].sort());
      expect(received.map((event) => event.handler_runs)).toEqual([1, 1, 1]);
    }, 90_000);

    it('copies that arrive while the first is still running all get its answer, and the handler runs once', async () => {
      const { id, body } = eventBody();
      let firstSettled = false;
      const first = deliver(client, body).then((answer) => {
        firstSettled = true;
        return answer;
      });
      await shop.waitForOutput(new RegExp(`Handling charge\\.succeeded ${id}`), 30_000);
      const copies = Promise.all([0, 1, 2, 3].map(() => deliver(client, body)));
      // Sent while the first's handler was still at work: what this test is about.
      expect(firstSettled).toBe(false);
      const answers: Exchange[] = [await first, ...(await copies)];

      expect(answers.map((answer) => answer.status)).toEqual([200, 200, 200, 200, 200]);
      expect(answers.map(isReplay)).toEqual([false, true, true, true, true]);
      expect(new Set(answers.map((answer) => answer.text)).size).toBe(1);
      expect(jsonOf(answers[0])).toMatchObject({ received: true, event_id: id });
      // A copy long after: the same answer still.
      const later = await deliver(client, body);
      expect([later.status, isReplay(later), later.text]).toEqual([200, true, answers[0].text]);

      const received = await receivedOf(client, [id]);
      expect(received).toEqual([expect.objectContaining({ event_id: id, handler_runs: 1 })]);
    }, 90_000);

    it('refuses a forged or stale signature with 400 before any lookup: nothing is recorded, and the genuine copy then runs the handler', async () => {
      const { id, body } = eventBody();
      const forged = await deliver(client, body, signWebhook(body, 'whsec_not_the_secret'));
      const tampered = await deliver(client, body.replace('1200', '1'), signWebhook(body, SECRET));
      const stale = await deliver(
        client,
        body,
        signWebhook(body, SECRET, new Date(Date.now() - 10 * 60_000)),
      );
      const unsigned = await client.send('/webhooks/gateway', {
        body,
        headers: { 'Content-Type': 'application/json' },
      });
      for (const refused of [forged, tampered, stale, unsigned]) {
        expect(refused.status).toBe(400);
        expect(jsonOf(refused)).toMatchObject({ error: 'invalid_signature' });
        expect(isReplay(refused)).toBe(false);
      }
      expect(await receivedOf(client, [id])).toEqual([]);

      const genuine = await deliver(client, body);
      expect([genuine.status, isReplay(genuine)]).toEqual([200, false]);
      expect(await receivedOf(client, [id])).toEqual([
        expect.objectContaining({ event_id: id, handler_runs: 1 }),
      ]);
    }, 60_000);
  });

  it('a receiver killed mid-delivery: after its restart the gateway’s retry completes, and the event is recorded once', async () => {
    const dataDir = newDataDir();
    // The handler takes a minute: the process is killed while it runs, its row written in the
    // transaction but not committed, the gateway's two copies unanswered.
    const doomed = await startShop(dataDir, { WEBHOOK_HANDLER_LATENCY_MS: '60000' });
    const amount = randomInt(10_000_000, 100_000_000);
    const payment = doomed.client.post('/payments', randomUUID(), {
      amount,
      currency: 'eur',
      source: 'tok_visa',
    });
    const [, id] = await doomed.shop.waitForOutput(
      /Handling charge\.succeeded (evt_[\w-]+)/,
      30_000,
    );
    await doomed.shop.stop('SIGKILL');
    await payment;

    const restarted = await startShop(dataDir, { WEBHOOK_HANDLER_LATENCY_MS: '0' });
    const { client } = restarted;
    const event = await waitFor(
      'the gateway to deliver the event again',
      async () => {
        const events = await get<GatewayEvent[]>(client, '/gateway/webhooks');
        const ours = events.find((candidate) => candidate.id === id);
        return ours?.delivered_at ? ours : undefined;
      },
      { timeoutMs: 45_000, intervalMs: 200 },
    ).catch((error: Error) => {
      throw new Error(`${error.message}; the restarted shop printed:\n${restarted.shop.output()}`);
    });
    // The killed round's copies got no answer (and none was recorded); the sender retried until a
    // 2xx, which ran the handler as a first time: the killed run left nothing behind.
    const answered = event.copies.filter((copy) => copy.status >= 200 && copy.status < 300);
    expect(answered.length).toBeGreaterThanOrEqual(1);
    expect(answered[0]).toMatchObject({ copy: 'retry', replayed: false });
    expect(JSON.parse(answered[0].response)).toMatchObject({ received: true, event_id: id });

    const received = await receivedOf(client, [id]);
    expect(received).toEqual([expect.objectContaining({ event_id: id, handler_runs: 1 })]);
    expect(received[0].object_id).toMatch(/^ch_/);
    const charges = await get<{ id: string; amount: number }[]>(client, '/gateway/charges');
    expect(charges.filter((charge) => charge.amount === amount)).toEqual([
      expect.objectContaining({ id: received[0].object_id }),
    ]);
  }, 180_000);
});
