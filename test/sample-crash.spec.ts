import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HttpClient, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { waitFor } from './support/reliability.js';

/**
 * The sample shop as a user runs it (`node dist/sample/main.js`, PGlite in a folder), killed in the
 * middle of an operation and started again on the same folder; the client retries with its key.
 */
describe('the sample shop killed mid-operation (PGlite folder, real processes)', () => {
  let dataDir: string;
  const shops: AppProcess[] = [];
  const clients: HttpClient[] = [];

  async function startShop(
    env: Record<string, string> = {},
  ): Promise<{ shop: AppProcess; client: HttpClient }> {
    const shop = await startAppProcess(
      'sample/main.js',
      {
        DATABASE_URL: '',
        SAMPLE_DATA_DIR: dataDir,
        PORT: '0',
        IDEMPOTENCY_LOCK_TIMEOUT: '1s',
        GATEWAY_LATENCY_MS: '10',
        ...env,
      },
      /Listening on http:\/\/localhost:(\d+)/,
    );
    const client = new HttpClient(shop.baseUrl, 4);
    shops.push(shop);
    clients.push(client);
    return { shop, client };
  }

  const get = async (client: HttpClient, path: string) =>
    jsonOf(await client.send(path, { method: 'GET' }));

  /** Retries until the dead process's claim has been taken over (no more 409). */
  const retry = (client: HttpClient, path: string, key: string, body: object) =>
    waitFor(
      'the retry to be answered',
      async () => {
        const answer: Exchange = await client.post(path, key, body);
        return answer.status === 409 ? undefined : answer;
      },
      { timeoutMs: 15_000, intervalMs: 200 },
    );

  beforeEach(() => {
    dataDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-sample-'));
  });
  afterEach(async () => {
    clients.splice(0).forEach((client) => client.close());
    await Promise.all(shops.splice(0).map((shop) => shop.stop('SIGKILL')));
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(`${dataDir}.lock`, { force: true });
  });

  it('killed during the gateway call, after the card was charged: the retry charges nobody twice', async () => {
    const { shop, client } = await startShop({ GATEWAY_LATENCY_MS: '60000' });
    const key = randomUUID();
    const payment = {
      amount: 1000,
      currency: 'eur',
      source: 'tok_visa',
      reference: `crash-${key}`,
    };
    const lost = client.post('/payments', key, payment);
    await shop.waitForOutput(/Charged 1000 eur: (ch_\S+)/);
    await shop.stop('SIGKILL');
    expect((await lost).status).toBe(0);

    const restarted = await startShop();
    const answer = await retry(restarted.client, '/payments', key, payment);
    expect(answer.status).toBe(201);
    expect(isReplay(answer)).toBe(false);
    const charges: { id: string; idempotency_key: string }[] = await get(
      restarted.client,
      '/gateway/charges',
    );
    expect(charges).toHaveLength(1);
    expect(charges[0].idempotency_key).toMatch(/^[0-9a-f-]{36}$/);
    const payments: { reference: string }[] = await get(restarted.client, '/payments');
    expect(payments.filter((p) => p.reference === payment.reference)).toHaveLength(1);
    const replay = await restarted.client.post('/payments', key, payment);
    expect(isReplay(replay)).toBe(true);
    expect(jsonOf(replay)).toEqual(jsonOf(answer));
  }, 60_000);

  it.each([
    ['/transfers/plain-mode', 'the plain mode moves the money again', 2],
    ['/transfers', 'the transactional mode moves it once', 1],
  ])(
    'killed right after a transfer moved the money (%s): %s',
    async (path, _what, moved) => {
      const doomed = await startShop({ SAMPLE_CRASH_AFTER_TRANSFER: '1' });
      const before = Number((await get(doomed.client, '/accounts/acc_alice')).balance);
      const key = randomUUID();
      const transfer = { from_account: 'acc_alice', to_account: 'acc_bob', amount: 100 };
      expect((await doomed.client.post(path, key, transfer)).status).toBe(0);
      await doomed.shop.stop();

      const restarted = await startShop();
      expect((await retry(restarted.client, path, key, transfer)).status).toBe(201);
      const after = Number((await get(restarted.client, '/accounts/acc_alice')).balance);
      expect((before - after) / 100).toBe(moved);
      expect(isReplay(await restarted.client.post(path, key, transfer))).toBe(true);
    },
    60_000,
  );
});
