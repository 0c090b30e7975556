import { randomUUID } from 'node:crypto';
import { HttpClient, isReplay, jsonOf } from './support/http-client.js';
import { eachDatabase } from './support/databases.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { waitFor } from './support/reliability.js';

/** The app's database, as the cls-server process takes it (see test/fixtures/cls-server.ts). */
function serverEnv(name: string, options: { type?: string; url?: string }): Record<string, string> {
  return name === 'pglite'
    ? { DB_TYPE: 'pglite' }
    : { DB_TYPE: options.type!, DB_URL: options.url! };
}

interface State {
  ledger: string[];
  record: { state: string; leaseToken: string } | null;
  leaseLost: number;
}

describe.each(eachDatabase.filter(([, database]) => database.transactions))(
  '@nestjs-cls/transactional joins the transactional mode on %s',
  (name, database) => {
    let server: AppProcess;
    let client: HttpClient;
    const stateOf = async (key: string) =>
      jsonOf(await client.send(`/cls/state/${key}`, { method: 'GET' })) as State;

    beforeAll(async () => {
      server = await startAppProcess(
        'test/fixtures/cls-server.js',
        serverEnv(name, database.options() as { type?: string; url?: string }),
      );
      client = new HttpClient(server.baseUrl, 4);
    }, 30_000);
    afterAll(async () => {
      client?.close();
      await server?.stop();
    });

    it('the @Transactional() write commits with the stored response; a retry replays it', async () => {
      const key = randomUUID();
      const first = await client.post('/cls/book', key, {});
      expect(first.status).toBe(201);
      const state = await stateOf(key);
      expect(state.ledger).toEqual([jsonOf(first).id]);
      expect(state.record?.state).toBe('completed');
      const retry = await client.post('/cls/book', key, {});
      expect(isReplay(retry)).toBe(true);
      expect(jsonOf(retry)).toEqual(jsonOf(first));
      expect((await stateOf(key)).ledger).toHaveLength(1);
    });

    // PGlite serves one transaction at a time: nothing can take a key over while its handler runs.
    if (name === 'pglite') return;

    it('the @Transactional() write rolls back when the lease is lost before completion', async () => {
      const key = randomUUID();
      const lostBefore = (await stateOf(key)).leaseLost;
      await client.send(`/cls/hold/${key}`);
      const first = client.post('/cls/book', key, {});
      await server.waitForOutput(new RegExp(`booked ${key}`));
      const { thief } = jsonOf(await client.send(`/cls/steal/${key}`));
      await waitFor('the renewal to find the lease gone', async () =>
        (await stateOf(key)).leaseLost > lostBefore ? true : undefined,
      );
      await client.send(`/cls/open/${key}`);
      const response = await first;
      expect(response.status).toBe(409);
      expect(jsonOf(response).type).toBe('tag:nestjs-idempotency,2026:lease-lost');
      const state = await stateOf(key);
      expect(state.ledger).toHaveLength(0);
      expect(state.record?.leaseToken).toBe(thief);
    });
  },
);
