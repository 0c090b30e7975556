import { jest } from '@jest/globals';
import { Controller, Headers, HttpException, Post } from '@nestjs/common';
import { createServer } from 'node:net';
import { randomUUID } from 'node:crypto';
import { DataSource, EntityManager, type DataSourceOptions } from 'typeorm';
import {
  Idempotent,
  IdempotencyMetrics,
  IdempotencyModule,
  IdempotencyRecord,
  IdempotentTransaction,
  TypeOrmIdempotencyStore,
  type ClaimRequest,
  type IdempotencyStore,
  type Lease,
  type StoredResponse,
} from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { recordsOf, waitUntilPast } from './fixtures/fixture-app.js';
import { CallLog, HandlerGate } from './fixtures/handler-probes.js';
import {
  createLedgerTable,
  LeaseController,
  LedgerEntry,
  ledgerOf,
} from './fixtures/lease.controller.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { CapturedLog } from './support/captured-log.js';
import { freezeClockAt, setClock } from './support/clock.js';
import { eachDatabase, type TestDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';
import { serverDatabases, startProxyFor, throughProxy } from './support/proxied-database.js';
import { waitFor } from './support/reliability.js';
import type { TcpProxy } from './support/tcp-proxy.js';

/** The lock of the routes here: renewed every 500 ms. */
const LOCK_MS = 1_500;

@Controller('review')
class ReviewController {
  constructor(
    private readonly calls: CallLog,
    private readonly gate: HandlerGate,
  ) {}

  @Post('held')
  @Idempotent({ lockTimeout: LOCK_MS })
  async held(@Headers('idempotency-key') key: string) {
    this.calls.record('held', key);
    await this.gate.pass(key);
    return { id: randomUUID() };
  }

  /** Its first run answers 503 (released), the next ones 201; renewed every 100 ms. */
  @Post('fails-once')
  @Idempotent({ lockTimeout: 300 })
  failsOnce(@Headers('idempotency-key') key: string) {
    this.calls.record('fails-once', key);
    if (this.calls.count('fails-once', key) === 1) throw new HttpException('upstream down', 503);
    return { id: randomUUID() };
  }
}

/** The key's lock (or TTL) as the table holds it. */
async function lockOf(dataSource: DataSource, key: string): Promise<number> {
  return Number((await recordsOf(dataSource, key))[0].expiresAt);
}

/** A renewal as the proxy sees it go by (see lease-renewal.spec.ts). */
const RENEWAL = /nestjs_idempotency_renew|GREATEST\(expires_at|SET `expires_at` = /;
/** A claim: PostgreSQL's (prepared, first use, batched) and MariaDB's insert. */
const CLAIM = /nestjs_idempotency_claim_|WITH live AS|WITH input AS|INSERT\s+IGNORE\s+INTO/;

/** `describe.each` over `databases` (server databases); skipped, saying so, when there is none. */
const describeEachServer = (databases: typeof serverDatabases) =>
  databases.length > 0
    ? describe.each(databases)
    : describe.skip.each([['no server database (set DATABASE_URL or MARIADB_URL)', undefined!]]);

const describeOnServers = describeEachServer(serverDatabases);

describeOnServers('lease keeping under review on %s', (_name, database: TestDatabase) => {
  let proxy: TcpProxy;
  let fixture: ReliabilityApp;
  /** Reads the table without the proxy. */
  let direct: DataSource;
  const log = new CapturedLog();

  beforeAll(async () => {
    proxy = await startProxyFor(database);
    fixture = await createReliabilityApp(
      throughProxy(database, proxy),
      { storeTimeout: 300 },
      { controllers: [ReviewController], logger: log },
    );
    direct = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await direct.initialize();
  });
  afterEach(() => proxy.releaseStalls());
  afterAll(async () => {
    await fixture?.close();
    await proxy?.close();
    await direct?.destroy();
  });

  it('a renewal that lands late, after later ones, never moves the lock back under a running handler', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/review/held', key).then((response) => response);
    await fixture.gate.arrived(key);
    // The first renewal stalls on its connection; the next ones, on other connections, go through.
    const stalledBefore = proxy.counts.stalled;
    proxy.stall(RENEWAL, 1);
    await waitFor('a renewal to stall', () =>
      proxy.counts.stalled > stalledBefore ? true : undefined,
    );
    // The stalled renewal asked for a lock until at most now + lockTimeout: let that pass.
    await waitUntilPast(Date.now() + LOCK_MS + 100);
    // Right after a later renewal extended the lock, the stalled one reaches the database.
    const before = await lockOf(direct, key);
    await waitFor('the next renewal', async () =>
      (await lockOf(direct, key)) > before ? true : undefined,
    );
    const renewed = await lockOf(direct, key);
    proxy.releaseStalls();
    // Until the next beat (500 ms later), the lock is whatever the late renewal left.
    let lowest = renewed;
    const until = Date.now() + 300;
    while (Date.now() < until) {
      lowest = Math.min(lowest, await lockOf(direct, key));
      if (lowest < Date.now()) break;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const duplicate = await post(fixture.baseUrl, '/review/held', key);
    fixture.gate.open(key);
    const original = await first;

    expect(duplicate.status).toBe(409);
    expect(original.status).toBe(201);
    expect(fixture.calls.count('held', key)).toBe(1);
    expect(lowest).toBeGreaterThanOrEqual(renewed);
    expect(fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost']).toBe(0);
  });

  it('a claim that lands after its request got 503 (storeTimeout) does not lock the key: the retry runs at once', async () => {
    const key = newKey();
    const stalledBefore = proxy.counts.stalled;
    proxy.stall(CLAIM, 1);
    const first = await post(fixture.baseUrl, '/review/held', key);
    expect(proxy.counts.stalled).toBe(stalledBefore + 1);
    expect(first.status).toBe(503);
    expect(fixture.calls.count('held', key)).toBe(0);
    // The network heals: the claim reaches the database and commits, with nobody to run it.
    proxy.releaseStalls();
    await waitFor('the late claim to be released', () =>
      log.lines.some((line) => /landed after its request was refused/.test(line.text))
        ? true
        : undefined,
    );
    const retry = await post(fixture.baseUrl, '/review/held', key);
    expect(retry.status).toBe(201);
    expect(fixture.calls.count('held', key)).toBe(1);
  });

  it('a lone claim whose answer was lost after it committed is recognised as its own: the request runs', async () => {
    const key = newKey();
    const droppedBefore = proxy.counts.repliesDropped;
    proxy.dropReplyTo(CLAIM);
    const first = await post(fixture.baseUrl, '/review/held', key);
    expect(proxy.counts.repliesDropped).toBe(droppedBefore + 1);
    expect(first.status).toBe(201);
    expect(fixture.calls.count('held', key)).toBe(1);
    const replay = await post(fixture.baseUrl, '/review/held', key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(first.body);
  });
});

/**
 * The real TypeORM store, except that the answer to the next completion or release is lost after
 * it committed (as when the connection is cut right then), and only after a while: long enough for
 * the renewal to beat several times and find the lease ended.
 */
class AnswerLosingStore implements IdempotencyStore {
  lose: 'complete' | 'release' | undefined;
  /** Renewals that found the lease no longer held. */
  renewalsFoundEnded = 0;

  constructor(private readonly inner: TypeOrmIdempotencyStore) {}

  claim(request: ClaimRequest) {
    return this.inner.claim(request);
  }
  complete(lease: Lease, response: StoredResponse, expiresAt: number) {
    return this.lost('complete', this.inner.complete(lease, response, expiresAt));
  }
  release(lease: Lease) {
    return this.lost('release', this.inner.release(lease));
  }
  async renew(lease: Lease, lockedUntil: number) {
    const renewed = await this.inner.renew(lease, lockedUntil);
    if (!renewed) this.renewalsFoundEnded++;
    return renewed;
  }
  leaseState(lease: Lease) {
    return this.inner.leaseState(lease);
  }
  purgeExpired(now: number, limit: number) {
    return this.inner.purgeExpired(now, limit);
  }

  private async lost(what: 'complete' | 'release', write: Promise<boolean>) {
    const done = await write;
    if (this.lose !== what) return done;
    this.lose = undefined;
    await new Promise((resolve) => setTimeout(resolve, 400));
    throw Object.assign(new Error('Connection terminated unexpectedly'), { code: 'ECONNRESET' });
  }
}

describe.each(eachDatabase)(
  'a write whose answer is lost under review on %s',
  (_name, database) => {
    let fixture: ReliabilityApp;
    let store: AnswerLosingStore;
    const log = new CapturedLog();
    const lostLeases = () => fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost'];

    beforeAll(async () => {
      fixture = await createReliabilityApp(
        database,
        {},
        {
          controllers: [LeaseController, ReviewController],
          logger: log,
          idempotencyModule: (dataSource) =>
            IdempotencyModule.forRootAsync({
              useFactory: async () => {
                await ensureIdempotencyTable(dataSource);
                store = new AnswerLosingStore(new TypeOrmIdempotencyStore(dataSource));
                return { store, purgeInterval: false };
              },
            }),
        },
      );
    });
    afterAll(() => fixture?.close());

    it('a completion that committed, its answer lost while the renewal found the lease ended: stored, replayed, no lease lost', async () => {
      const key = newKey();
      const endedBefore = store.renewalsFoundEnded;
      store.lose = 'complete';
      const original = await post(fixture.baseUrl, '/lease/held', key);
      expect(original.status).toBe(201);
      // The renewal (every 100 ms) beat during the 400 ms the answer was missing.
      expect(store.renewalsFoundEnded).toBeGreaterThan(endedBefore);
      const replay = await post(fixture.baseUrl, '/lease/held', key);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
      expect(fixture.calls.count('held', key)).toBe(1);
      expect(lostLeases()).toBe(0);
      expect(log.lines.filter((line) => /taken over/.test(line.text))).toEqual([]);
    });

    it('a release that committed, its answer lost while the renewal found the record gone: released, the retry runs, no lease lost', async () => {
      const key = newKey();
      const endedBefore = store.renewalsFoundEnded;
      store.lose = 'release';
      // A 5xx is released.
      const first = await post(fixture.baseUrl, '/review/fails-once', key);
      expect(first.status).toBe(503);
      expect(store.renewalsFoundEnded).toBeGreaterThan(endedBefore);
      expect(await recordsOf(fixture.dataSource, key)).toEqual([]);
      const retry = await post(fixture.baseUrl, '/review/fails-once', key);
      expect(retry.status).toBe(201);
      expect(fixture.calls.count('fails-once', key)).toBe(2);
      expect(lostLeases()).toBe(0);
    });
  },
);

describe.each(eachDatabase)('the wall clock under review on %s', (_name, database) => {
  let fixture: ReliabilityApp;
  const log = new CapturedLog();

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      {},
      { controllers: [ReviewController], logger: log },
    );
  });
  afterEach(() => jest.useRealTimers());
  afterAll(() => fixture?.close());

  it('a step of the wall clock past lockRenewalLimit (NTP, a VM resumed) does not stop the renewal of a handler that has run for a second', async () => {
    const key = newKey();
    freezeClockAt(Date.now());
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/review/held', key).then((response) => response);
    await fixture.gate.arrived(key);
    setClock(Date.now() + 20 * 60_000);
    // Two beats of the renewal (every lockTimeout / 3, on real timers) under the new time.
    await new Promise((resolve) => setTimeout(resolve, (2 * LOCK_MS) / 3 + 200));
    const duplicate = await post(fixture.baseUrl, '/review/held', key);
    fixture.gate.open(key);
    const original = await first;

    expect(duplicate.status).toBe(409);
    expect(original.status).toBe(201);
    expect(fixture.calls.count('held', key)).toBe(1);
    expect(log.lines.filter((line) => /presumed hung/.test(line.text))).toEqual([]);
  });
});

describe.each(eachDatabase)('shutdown under review on %s', (_name, database) => {
  /** Two instances of one app on one database, as behind a load balancer. */
  let closing: ReliabilityApp;
  let other: ReliabilityApp;

  beforeAll(async () => {
    closing = await createReliabilityApp(database, {}, { controllers: [ReviewController] });
    other = await createReliabilityApp(
      database,
      {},
      {
        controllers: [ReviewController],
        idempotencyModule: () =>
          IdempotencyModule.forRoot({ dataSource: closing.dataSource, purgeInterval: false }),
      },
    );
  });
  afterAll(async () => {
    await other?.app.close();
    await other?.dataSource.destroy();
    await closing?.close();
  });

  it('a handler still running when app.close() is called keeps its key while Nest drains it: a duplicate on another instance gets 409, the handler runs once', async () => {
    const key = newKey();
    closing.gate.hold(key);
    const first = post(closing.baseUrl, '/review/held', key).then((response) => response);
    await closing.gate.arrived(key);
    // A rolling deploy: SIGTERM, Nest closes the app and waits for the request in flight.
    const closed = closing.app.close();
    await waitUntilPast(Date.now() + 2 * LOCK_MS);
    const duplicate = await post(other.baseUrl, '/review/held', key);
    closing.gate.open(key);
    const original = await first;
    await closed;

    expect(duplicate.status).toBe(409);
    expect(original.status).toBe(201);
    const runs = () => closing.calls.count('held', key) + other.calls.count('held', key);
    expect(runs()).toBe(1);
    const replay = await post(other.baseUrl, '/review/held', key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(original.body);
    expect(runs()).toBe(1);
  });
});

/** How a transactional handler's statement fails, by database. */
function mysqlLike(manager: EntityManager): boolean {
  const type = manager.connection.options.type;
  return type === 'mysql' || type === 'mariadb';
}

/** A port nothing listens on: connecting to it is refused (ECONNREFUSED). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Transactional handlers that write a ledger row, then fail in one way or another. */
@Controller('review-tx')
class ReviewTransactionalController {
  constructor(private readonly calls: CallLog) {}

  /** Its own connection dies under it (the server terminates the session). */
  @Post('killed')
  @Idempotent({ transactional: true })
  async killed(
    @Headers('idempotency-key') key: string,
    @IdempotentTransaction() manager: EntityManager,
  ) {
    await this.recordAndWrite('killed', key, manager);
    if (this.calls.count('killed', key) === 1) {
      await manager.query(
        mysqlLike(manager)
          ? 'KILL CONNECTION CONNECTION_ID()'
          : 'SELECT pg_terminate_backend(pg_backend_pid())',
      );
    }
    return { ok: true };
  }

  /** A statement of its own runs past the server's statement timeout (PostgreSQL 57014). */
  @Post('statement-timeout')
  @Idempotent({ transactional: true })
  async statementTimeout(
    @Headers('idempotency-key') key: string,
    @IdempotentTransaction() manager: EntityManager,
  ) {
    await this.recordAndWrite('statement-timeout', key, manager);
    if (mysqlLike(manager)) {
      await manager.query('SET STATEMENT max_statement_time = 0.05 FOR SELECT SLEEP(1) FROM DUAL');
    } else {
      await manager.query("SET LOCAL statement_timeout = '50ms'");
      await manager.query('SELECT pg_sleep(1)');
    }
    return { ok: true };
  }

  /** Lets a refused connection to its gateway through, a network error that is not the database's. */
  @Post('gateway-down')
  @Idempotent({ transactional: true })
  async gatewayDown(
    @Headers('idempotency-key') key: string,
    @IdempotentTransaction() manager: EntityManager,
  ) {
    await this.recordAndWrite('gateway-down', key, manager);
    await fetch(`http://127.0.0.1:${await closedPort()}/charges`, { method: 'POST' });
    return { ok: true };
  }

  /** Counts the run of `route` and writes its ledger row in the handler's transaction. */
  private async recordAndWrite(route: string, key: string, manager: EntityManager) {
    this.calls.record(route, key);
    await manager.insert(LedgerEntry, { id: randomUUID(), key, amount: 1 });
  }
}

const describeTransactionalOnServers = describeEachServer(
  serverDatabases.filter(([, database]) => database.transactions),
);

describeTransactionalOnServers(
  'transactional errors under review on %s',
  (_name, database: TestDatabase) => {
    let fixture: ReliabilityApp;
    /** One connection in the pool: the one the transaction holds. */
    let tight: ReliabilityApp;

    beforeAll(async () => {
      const settings = { controllers: [ReviewTransactionalController], entities: [LedgerEntry] };
      fixture = await createReliabilityApp(database, { storeTimeout: '2s' }, settings);
      await createLedgerTable(fixture.dataSource);
      const extra = database.options().type === 'postgres' ? { max: 1 } : { connectionLimit: 1 };
      tight = await createReliabilityApp(
        { ...database, options: () => ({ ...database.options(), extra }) as DataSourceOptions },
        { storeTimeout: '2s' },
        settings,
      );
    });
    afterAll(async () => {
      await fixture?.close();
      await tight?.close();
    });

    it('its own connection killed under it: 503 store-unavailable, nothing committed, the retry runs once', async () => {
      const key = newKey();
      expectProblem(
        await post(fixture.baseUrl, '/review-tx/killed', key),
        503,
        'store-unavailable',
      );
      expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
      const retry = await post(fixture.baseUrl, '/review-tx/killed', key);
      expect(retry.status).toBe(201);
      expect(fixture.calls.count('killed', key)).toBe(2);
      expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(1);
    });

    it('its own statement past the statement timeout is its crash (500), rolled back and released', async () => {
      const key = newKey();
      const first = await post(fixture.baseUrl, '/review-tx/statement-timeout', key);
      expect(first.status).toBe(500);
      expect(first.body.type).not.toBe('tag:nestjs-idempotency,2026:store-unavailable');
      expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
      expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    });

    it('with every connection of the pool taken by its transaction, a network error it lets through is judged at once on that connection (500, not a wait for a second one)', async () => {
      const key = newKey();
      const started = Date.now();
      const first = await post(tight.baseUrl, '/review-tx/gateway-down', key);
      expect(first.status).toBe(500);
      expect(Date.now() - started).toBeLessThan(2_000);
      expect(await ledgerOf(tight.dataSource, key)).toHaveLength(0);
      expect(await recordsOf(tight.dataSource, key)).toHaveLength(0);
      expect((await post(tight.baseUrl, '/review-tx/gateway-down', key)).status).toBe(500);
      expect(tight.calls.count('gateway-down', key)).toBe(2);
    });
  },
);
