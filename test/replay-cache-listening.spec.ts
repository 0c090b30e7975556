/**
 * The replay cache of a process whose listening connection (which tells it what operators delete)
 * was opened by a waiting duplicate before the cache held anything: the store must tell the
 * listener the cache adds later that it listens, so the cache checks what it holds and, after the
 * connection is lost and back, caches again (docs/operations.md "Replay caches").
 *
 * Rows are deleted here by hand (raw SQL, raw Redis DEL), which tells nobody: only the cache can
 * still answer for such a key, so whether a retry replays tells whether the cache is in use.
 */
import { Module, type INestApplication } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { Redis } from 'ioredis';
import { randomUUID } from 'node:crypto';
import type request from 'supertest';
import {
  IdempotencyModule,
  IdempotencyStore,
  RedisIdempotencyStore,
  type RecordWatch,
} from '../lib/index.js';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from '../lib/idempotency.options.js';
import type { ReplayCache } from '../lib/replay-cache.js';
import { createFixtureApp } from './fixtures/fixture-app.js';
import { FixtureController } from './fixtures/fixture.controller.js';
import { CallLog, HandlerGate } from './fixtures/handler-probes.js';
import { newKey, post } from './support/http.js';
import { runTag, waitFor } from './support/reliability.js';

/** One app, with what the tests do to its store behind its back. */
interface Booted {
  readonly app: INestApplication;
  readonly http: any;
  readonly calls: CallLog;
  readonly gate: HandlerGate;
  readonly store: IdempotencyStore;
  readonly cache: ReplayCache;
  /** The ids of the app's listening connections, as the server lists them. */
  listeningConnections(): Promise<string[]>;
  /** Closes one of them from the server's side. */
  kill(id: string): Promise<void>;
  /** Deletes the key's record without telling anyone; resolves to how many were deleted. */
  deleteByHand(key: string): Promise<number>;
  close(): Promise<void>;
}

interface Backend {
  readonly name: string;
  boot(): Promise<Booted>;
}

function parts(app: INestApplication) {
  return {
    app,
    http: app.getHttpServer(),
    calls: app.get(CallLog),
    gate: app.get(HandlerGate),
    store: app.get<IdempotencyStore>(IdempotencyStore),
    cache: app.get<ResolvedModuleOptions>(RESOLVED_OPTIONS).replayCache!,
  };
}

const DATABASE_URL = process.env.DATABASE_URL;
const REDIS_URL = process.env.REDIS_URL;

/** PostgreSQL: the LISTEN backend is the app's session whose last statement is the LISTEN. */
const postgres: Backend = {
  name: 'PostgreSQL',
  async boot() {
    const applicationName = runTag('cache_listening');
    const keys: string[] = [];
    const fixture = await createFixtureApp({
      name: 'postgres',
      shared: true,
      ownTablePerConnection: false,
      transactions: true,
      options: () => ({ type: 'postgres', url: DATABASE_URL!, applicationName }),
    });
    const db = fixture.dataSource;
    return {
      ...parts(fixture.app),
      async listeningConnections() {
        const rows: { pid: number }[] = await db.query(
          `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'`,
          [applicationName],
        );
        return rows.map((row) => String(row.pid));
      },
      async kill(pid) {
        await db.query('SELECT pg_terminate_backend($1)', [Number(pid)]);
      },
      async deleteByHand(key) {
        keys.push(key);
        const [, deleted] = (await db.query(
          'DELETE FROM idempotency_records WHERE idempotency_key = $1',
          [key],
        )) as [unknown, number];
        return deleted;
      },
      async close() {
        await fixture.close();
      },
    };
  },
};

/** Redis: the store's subscriber is a duplicate of its client, so it has the client's name. */
const redis: Backend = {
  name: 'Redis',
  async boot() {
    const name = runTag('cache_listening');
    const prefix = `${name}:`;
    // What the README recommends for the store's client, plus a name to find it by.
    const client = new Redis(REDIS_URL!, {
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      connectionName: name,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('ready', resolve);
      client.once('error', reject);
    });
    const observer = new Redis(REDIS_URL!);
    const store = new RedisIdempotencyStore(client, { prefix });
    @Module({
      imports: [IdempotencyModule.forRoot({ store })],
      controllers: [FixtureController],
      providers: [CallLog, HandlerGate],
    })
    class RedisAppModule {}
    const moduleRef = await Test.createTestingModule({ imports: [RedisAppModule] }).compile();
    const app = moduleRef.createNestApplication({ logger: false });
    await app.init();
    const recordKeys = async (pattern: string) => {
      const found: string[] = [];
      let cursor = '0';
      do {
        const [next, batch] = await observer.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
        found.push(...batch);
        cursor = next;
      } while (cursor !== '0');
      return found;
    };
    return {
      ...parts(app),
      async listeningConnections() {
        const list = (await observer.client('LIST')) as string;
        return list
          .split('\n')
          .map((line) => Object.fromEntries(line.split(' ').map((field) => field.split('='))))
          .filter((fields) => fields.name === name && Number(fields.sub) > 0)
          .map((fields) => String(fields.id));
      },
      async kill(id) {
        await observer.client('KILL', 'ID', id);
      },
      async deleteByHand(key) {
        const names = await recordKeys(`${prefix}*${key}*`);
        return names.length === 0 ? 0 : observer.del(...names);
      },
      async close() {
        await app.close();
        client.disconnect();
        const names = await recordKeys(`${prefix}*`);
        if (names.length > 0) await observer.del(...names);
        observer.disconnect();
      },
    };
  },
};

const backends = [...(DATABASE_URL ? [postgres] : []), ...(REDIS_URL ? [redis] : [])];
const describeBackends =
  backends.length > 0
    ? describe.each(backends)
    : describe.skip.each([{ name: 'no server (set DATABASE_URL or REDIS_URL)' } as Backend]);

const replayed = (response: request.Response) => response.headers['idempotent-replayed'] === 'true';

describeBackends(
  'the replay cache on $name, listening opened by a waiting duplicate',
  (backend) => {
    let booted: Booted | undefined;
    let probe: RecordWatch | undefined;
    afterEach(async () => {
      probe?.close();
      probe = undefined;
      await booted?.close();
      booted = undefined;
    });

    /**
     * A duplicate of a held request on `route` (a `concurrency: 'wait'` route) waits: it opens the
     * store's listening connection. Resolves once the store listens, with the connection's id, the
     * held request and the duplicate (which settle once the gate opens).
     */
    async function openedByAWaiter(a: Booted, route: string) {
      const key = newKey();
      a.gate.hold(key);
      // supertest sends on `then`: start both requests now.
      const held = post(a.http, route, key).then((response) => response);
      await a.gate.arrived(key);
      const waiter = post(a.http, route, key).then((response) => response);
      const [id] = await waitFor('the listening connection', async () => {
        const ids = await a.listeningConnections();
        return ids.length === 1 ? ids : undefined;
      });
      // A watch of a record nobody changes, to read whether the store listens (the connection is
      // open already: this opens none).
      probe = a.store.watch!({ scope: '', endpoint: 'probe', key: randomUUID() })!;
      await waitFor('the store to listen', () => (probe!.live ? true : undefined));
      return { id, key, held, waiter };
    }

    it('caches again after the connection is lost and back', async () => {
      const a = (booted = await backend.boot());
      const opened = await openedByAWaiter(a, '/slow-wait');
      a.gate.open(opened.key);
      const [done, waited] = await Promise.all([opened.held, opened.waiter]);
      expect(done.status).toBe(201);
      // The duplicate's replay is the first record the process caches: the cache starts listening
      // for deletions now, on a connection that listens already.
      expect(replayed(waited)).toBe(true);

      // The cache answers: a key whose row is gone still replays.
      const before = newKey();
      const beforeFirst = await post(a.http, '/charges', before, { amount: 1 }).expect(201);
      expect(replayed(await post(a.http, '/charges', before, { amount: 1 }).expect(201))).toBe(
        true,
      );
      expect(await a.deleteByHand(before)).toBe(1);
      const fromCache = await post(a.http, '/charges', before, { amount: 1 }).expect(201);
      expect(replayed(fromCache)).toBe(true);
      expect(fromCache.body).toEqual(beforeFirst.body);
      expect(a.calls.count('charges', before)).toBe(1);

      // The connection is lost (the cache is emptied and suspended) and comes back.
      await a.kill(opened.id);
      await waitFor('the listening connection to be back', async () => {
        const ids = await a.listeningConnections();
        return ids.length === 1 && ids[0] !== opened.id && probe!.live ? true : undefined;
      });

      const key = newKey();
      const first = await post(a.http, '/charges', key, { amount: 1 }).expect(201);
      expect(replayed(await post(a.http, '/charges', key, { amount: 1 }).expect(201))).toBe(true);
      expect(await a.deleteByHand(key)).toBe(1);
      const retry = await post(a.http, '/charges', key, { amount: 1 }).expect(201);
      // Before the fix the process never heard the connection listen before it was lost, so it
      // took the reconnect for its first listen, which never resumed the suspended cache: the
      // retry missed the cache, found no row and ran the handler again.
      expect(replayed(retry)).toBe(true);
      expect(retry.body).toEqual(first.body);
      expect(a.calls.count('charges', key)).toBe(1);
    });

    it('a record deleted just before the cache held it, its first, is not replayed', async () => {
      const a = (booted = await backend.boot());
      // The duplicate gives up after 200 ms (409) and caches nothing; the connection stays open.
      const opened = await openedByAWaiter(a, '/short-wait');
      expect((await opened.waiter).status).toBe(409);
      a.gate.open(opened.key);
      expect((await opened.held).status).toBe(201);

      const key = newKey();
      await post(a.http, '/charges', key, { amount: 1 }).expect(201);
      // The race this stands for: a request reads the completed record, an operator deletes it
      // (its notification reaches nobody: the cache does not listen yet), and the request caches
      // what it read, the process's first record, so the cache starts listening now.
      const [record] = await a.store.findRecords!({ key, limit: 1 });
      expect(await a.deleteByHand(key)).toBe(1);
      a.cache.set(record.id, {
        fingerprint: record.fingerprint,
        token: record.token,
        expiresAt: record.expiresAt,
        response: record.response!,
      });

      // Told at once that the store listens, the cache checks what it holds and drops the record
      // the store no longer has: the key runs again. Before the fix it was never told, and replayed
      // the deleted record until its TTL ended.
      const rerun = await waitFor(
        'a retry that is not replayed from the cache',
        async () => {
          const response = await post(a.http, '/charges', key, { amount: 1 }).expect(201);
          return replayed(response) ? undefined : response;
        },
        { timeoutMs: 5_000, intervalMs: 50 },
      );
      expect(a.calls.count('charges', key)).toBe(2);
      const again = await post(a.http, '/charges', key, { amount: 1 }).expect(201);
      expect(replayed(again)).toBe(true);
      expect(again.body).toEqual(rerun.body);
    });
  },
);
