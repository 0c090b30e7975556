import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  IdempotencyMetrics,
  IdempotencyRecord,
  TypeOrmIdempotencyStore,
  type ClaimResult,
  type Lease,
} from '../lib/index.js';
import { recordsOf, stealClaim, waitUntilPast } from './fixtures/fixture-app.js';
import {
  createLedgerTable,
  LeaseController,
  LedgerEntry,
  LedgerService,
  ledgerOf,
  SHORT_LOCK_MS,
  TransactionalLeaseController,
} from './fixtures/lease.controller.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';
import { serverDatabases, startProxyFor, throughProxy } from './support/proxied-database.js';
import { report, waitFor } from './support/reliability.js';
import type { TcpProxy } from './support/tcp-proxy.js';

/** How long the tests hold a handler: more than three times its lockTimeout. */
const HELD_MS = 4 * SHORT_LOCK_MS;

/** The key's one record, read from the table. */
async function recordOf(fixture: ReliabilityApp, key: string): Promise<IdempotencyRecord> {
  const [record] = await recordsOf(fixture.dataSource, key);
  return record;
}

describe.each(eachDatabase)('lease renewal on %s', (_name, database) => {
  let fixture: ReliabilityApp;
  const log = new CapturedLog();
  const lostLeases = () => fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost'];

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      { waitPollInterval: 20 },
      { controllers: [LeaseController], logger: log },
    );
  });
  afterAll(() => fixture.close());

  /** Sends retries, one after another, while the handler is held for HELD_MS; returns their statuses. */
  async function retriesWhileHeld(path: string, key: string): Promise<number[]> {
    const statuses: number[] = [];
    const until = Date.now() + HELD_MS;
    while (Date.now() < until) {
      statuses.push((await post(fixture.baseUrl, path, key)).status);
      await new Promise((resolve) => setTimeout(resolve, SHORT_LOCK_MS / 3));
    }
    return statuses;
  }

  it('a handler three times longer than lockTimeout keeps its key: retries get 409, it runs once, then replays', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/held', key).then((response) => response);
    await fixture.gate.arrived(key);
    const claimedUntil = Number((await recordOf(fixture, key)).expiresAt);

    const statuses = await retriesWhileHeld('/lease/held', key);
    const renewedUntil = Number((await recordOf(fixture, key)).expiresAt);
    fixture.gate.open(key);
    const original = await first;

    expect(statuses.length).toBeGreaterThanOrEqual(6);
    expect(new Set(statuses)).toEqual(new Set([409]));
    expect(renewedUntil).toBeGreaterThan(claimedUntil + SHORT_LOCK_MS);
    expect(original.status).toBe(201);
    const replay = await post(fixture.baseUrl, '/lease/held', key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(original.body);
    expect(fixture.calls.count('held', key)).toBe(1);
    report(
      `lease renewal on ${database.name}: handler held ${HELD_MS} ms, lockTimeout ${SHORT_LOCK_MS} ms`,
      {
        'retries while it ran': `${statuses.length}, all 409`,
        'lock extended by renewal': `${renewedUntil - claimedUntil} ms`,
        'handler runs': fixture.calls.count('held', key),
      },
    );
  });

  it('in wait mode a duplicate keeps waiting while the claim is renewed, then replays', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/held-wait', key).then((response) => response);
    await fixture.gate.arrived(key);
    const duplicate = post(fixture.baseUrl, '/lease/held-wait', key).then((response) => response);
    // The duplicate is now waiting; the first outlives its lockTimeout several times over.
    await waitUntilPast(Date.now() + HELD_MS);
    fixture.gate.open(key);
    const [original, waited] = await Promise.all([first, duplicate]);
    expect(original.status).toBe(201);
    expect(waited.status).toBe(201);
    expect(waited.headers['idempotent-replayed']).toBe('true');
    expect(waited.body).toEqual(original.body);
    expect(fixture.calls.count('held-wait', key)).toBe(1);
  });

  it('stops renewing when the handler settles: the completed record keeps its TTL and no lease is lost', async () => {
    const key = newKey();
    const lostBefore = lostLeases();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/held', key).then((response) => response);
    await fixture.gate.arrived(key);
    await waitUntilPast(Date.now() + SHORT_LOCK_MS);
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
    const completed = await recordOf(fixture, key);
    await waitUntilPast(Date.now() + 2 * SHORT_LOCK_MS);
    const later = await recordOf(fixture, key);
    expect(later.state).toBe('completed');
    expect(Number(later.expiresAt)).toBe(Number(completed.expiresAt));
    expect(lostLeases()).toBe(lostBefore);
  });

  it('stops at lockRenewalLimit: a hung handler is logged as an error and its key taken over lockTimeout later', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const hung = post(fixture.baseUrl, '/lease/capped', key).then((response) => response);
    await fixture.gate.arrived(key);
    // Renewed for 600 ms; the lock then runs out at most lockTimeout after the last renewal.
    const lastLock = await waitFor(
      'the renewal to stop',
      async () => {
        const until = Number((await recordOf(fixture, key)).expiresAt);
        return Date.now() > until ? until : undefined;
      },
      { timeoutMs: 5_000 },
    );
    const takeover = await post(fixture.baseUrl, '/lease/capped', key);
    expect(takeover.status).toBe(201);
    expect(takeover.headers['idempotent-replayed']).toBeUndefined();
    expect(fixture.calls.count('capped', key)).toBe(2);
    expect(
      log.lines.some(
        (line) => line.level === 'error' && /lockRenewalLimit \(600 ms\)/.test(line.text),
      ),
    ).toBe(true);
    fixture.gate.open(key);
    await hung;
    expect(lastLock).toBeGreaterThan(0);
  });

  it('reports a lost lease: the renewal finds the claim taken over, logs it and counts it once', async () => {
    const key = newKey();
    const lostBefore = lostLeases();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/held', key).then((response) => response);
    await fixture.gate.arrived(key);
    const thief = await stealClaim(fixture.dataSource, key);
    await waitFor('the renewal to find the lease gone', () =>
      lostLeases() > lostBefore ? true : undefined,
    );
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
    // Its completion finds the lease gone too: still one lost lease, and the thief's record stays.
    expect(lostLeases()).toBe(lostBefore + 1);
    const record = await recordOf(fixture, key);
    expect(record.state).toBe('in_progress');
    expect(record.leaseToken).toBe(thief);
    expect(
      log.lines.some((line) => line.level === 'warn' && /was taken over/.test(line.text)),
    ).toBe(true);
  });

  it('stops renewing once the app has closed, so a process going down does not keep its keys', async () => {
    // Its open connections are destroyed at close: the app closes while the handler still runs.
    const own = await createReliabilityApp(
      database,
      {},
      { controllers: [LeaseController], appOptions: { forceCloseConnections: true } },
    );
    const key = newKey();
    own.gate.hold(key);
    const first = post(own.baseUrl, '/lease/held', key).then(
      (response) => response,
      () => undefined,
    );
    await own.gate.arrived(key);
    await waitUntilPast(Date.now() + SHORT_LOCK_MS);
    const closing = own.app.close();
    // No renewal after the app closed: the lock runs out while the handler is still held (with
    // renewal going on, it would stay ahead of the clock and this wait would time out).
    // (Without forceCloseConnections, Nest waits for the request and the key stays renewed
    // until it settles: see review-core.spec.ts.)
    const until = await waitFor(
      'the lock to run out',
      async () => {
        const expiresAt = Number((await recordsOf(own.dataSource, key))[0].expiresAt);
        return Date.now() > expiresAt ? expiresAt : undefined;
      },
      { timeoutMs: 3_000 },
    );
    await waitUntilPast(Date.now() + SHORT_LOCK_MS);
    const [record] = await recordsOf(own.dataSource, key);
    expect(record.state).toBe('in_progress');
    expect(Number(record.expiresAt)).toBe(until);
    own.gate.open(key);
    await closing;
    await first;
    await own.dataSource.destroy();
  });
});

/**
 * The statements of the store, as the proxy sees them go by: their SQL (PostgreSQL's first use on
 * a connection, its unprepared runs inside transactions, every MariaDB statement) or the name of
 * the prepared statement (PostgreSQL's later uses).
 */
const COMPLETION = /SET state = 'completed'|nestjs_idempotency_complete|SET `state` = 'completed'/;
const RENEWAL = /nestjs_idempotency_renew|GREATEST\(expires_at|SET `expires_at` = /;
const BATCHED_CLAIM = /WITH input AS/;
const BATCHED_COMPLETION = /WITH ORDINALITY AS i\(scope, endpoint, idempotency_key, lease_token/;

describe.each(serverDatabases)(
  'lease keeping over a stalled connection on %s',
  (name, database) => {
    let proxy: TcpProxy;
    let fixture: ReliabilityApp;
    /** Reads the table without the proxy. */
    let direct: DataSource;
    const log = new CapturedLog();
    const lostLeases = () => fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost'];

    beforeAll(async () => {
      proxy = await startProxyFor(database);
      fixture = await createReliabilityApp(
        throughProxy(database, proxy),
        // A stalled completion is given up on after 1 s and tried again (3 attempts in 2.3 s).
        { storeTimeout: '1s' },
        {
          controllers: [LeaseController, TransactionalLeaseController],
          providers: [LedgerService],
          entities: [LedgerEntry],
          logger: log,
        },
      );
      await createLedgerTable(fixture.dataSource);
      direct = new DataSource({
        ...database.options(),
        entities: [IdempotencyRecord, LedgerEntry],
      });
      await direct.initialize();
    });
    afterEach(() => proxy.releaseStalls());
    afterAll(async () => {
      await fixture?.close();
      await proxy?.close();
      await direct?.destroy();
    });

    /** Once the proxy stalls a statement: the key's lock as it stood then. */
    async function lockWhenStalled(key: string, stalledBefore: number): Promise<number> {
      await waitFor('a statement to stall', () =>
        proxy.counts.stalled > stalledBefore ? true : undefined,
      );
      return Number((await recordsOf(direct, key))[0].expiresAt);
    }

    it('keeps renewing while a stalled completion is retried: a duplicate does not run the handler again', async () => {
      const key = newKey();
      const lostBefore = lostLeases();
      fixture.gate.hold(key);
      const first = post(fixture.baseUrl, '/lease/held', key).then((response) => response);
      await fixture.gate.arrived(key);
      // The handler returns; its first two completions stall, the third gets through ~2.3 s later.
      const stalledBefore = proxy.counts.stalled;
      proxy.stall(COMPLETION, 2);
      fixture.gate.open(key);
      const lock = await lockWhenStalled(key, stalledBefore);
      // Well past the lock as it stood when the completion stalled.
      await waitUntilPast(lock + SHORT_LOCK_MS);
      const duplicate = await post(fixture.baseUrl, '/lease/held', key);
      const original = await first;

      expect(proxy.counts.stalled).toBe(stalledBefore + 2);
      expect(original.status).toBe(201);
      expect(duplicate.status).toBe(409);
      expect(fixture.calls.count('held', key)).toBe(1);
      const replay = await post(fixture.baseUrl, '/lease/held', key);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
      // The stalled attempts landing late find the response stored: no lease was lost.
      proxy.releaseStalls();
      expect(lostLeases()).toBe(lostBefore);
    });

    it('transactional: keeps renewing while the completion in the transaction is stalled: a duplicate gets 409, the handler runs once', async () => {
      const key = newKey();
      fixture.gate.hold(key);
      const first = post(fixture.baseUrl, '/lease/tx', key, { amount: 4 }).then((r) => r);
      await fixture.gate.arrived(key);
      const stalledBefore = proxy.counts.stalled;
      proxy.stall(COMPLETION, 1);
      fixture.gate.open(key);
      const lock = await lockWhenStalled(key, stalledBefore);
      await waitUntilPast(lock + SHORT_LOCK_MS);
      const duplicate = await post(fixture.baseUrl, '/lease/tx', key, { amount: 4 });
      proxy.releaseStalls();
      const original = await first;

      expect(duplicate.status).toBe(409);
      expect(original.status).toBe(201);
      expect(fixture.calls.count('tx', key)).toBe(1);
      expect(await ledgerOf(direct, key)).toHaveLength(1);
      const replay = await post(fixture.baseUrl, '/lease/tx', key, { amount: 4 });
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
    });

    it('a renewal that never answers does not stop the next ones: the key stays claimed', async () => {
      const key = newKey();
      fixture.gate.hold(key);
      const first = post(fixture.baseUrl, '/lease/held', key).then((response) => response);
      await fixture.gate.arrived(key);
      const stalledBefore = proxy.counts.stalled;
      proxy.stall(RENEWAL, 1);
      const lock = await lockWhenStalled(key, stalledBefore);
      await waitUntilPast(lock + SHORT_LOCK_MS);
      const duplicate = await post(fixture.baseUrl, '/lease/held', key);
      fixture.gate.open(key);
      const original = await first;

      expect(duplicate.status).toBe(409);
      expect(original.status).toBe(201);
      expect(fixture.calls.count('held', key)).toBe(1);
      expect(Number((await recordsOf(direct, key))[0].expiresAt)).toBeGreaterThan(lock);
    });

    it('a completion whose answer was lost after it committed counts as stored, not as a lost lease', async () => {
      const key = newKey();
      const lostBefore = lostLeases();
      const droppedBefore = proxy.counts.repliesDropped;
      proxy.dropReplyTo(COMPLETION);
      const original = await post(fixture.baseUrl, '/lease/held', key);
      expect(proxy.counts.repliesDropped).toBe(droppedBefore + 1);
      expect(original.status).toBe(201);
      const replay = await post(fixture.baseUrl, '/lease/held', key);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(original.body);
      expect(lostLeases()).toBe(lostBefore);
      expect(log.lines.filter((line) => line.text.includes('was taken over'))).toEqual([]);
    });

    (name.startsWith('postgres') || name.startsWith('pgbouncer') ? it : it.skip)(
      'batched claims and completions whose answer was lost after they committed are recognised as their own',
      async () => {
        const store = new TypeOrmIdempotencyStore(fixture.dataSource, { waitNotifications: false });
        const scope = `reply-lost-${randomUUID()}`;
        const now = Date.now();
        const requests = [newKey(), newKey()].map((key) => ({
          id: { scope, endpoint: 'POST /batched', key },
          fingerprint: 'fp',
          token: randomUUID(),
          now,
          lockedUntil: now + 60_000,
        }));
        try {
          let dropped = proxy.counts.repliesDropped;
          proxy.dropReplyTo(BATCHED_CLAIM);
          // Claimed in one turn of the event loop: one statement for both.
          const claims: ClaimResult[] = await Promise.all(requests.map((r) => store.claim(r)));
          expect(proxy.counts.repliesDropped).toBe(dropped + 1);
          expect(claims.map((claim) => claim.claimed)).toEqual([true, true]);
          const leases = claims.map((claim) => (claim as { lease: Lease }).lease);
          expect(leases.map((lease) => lease.token)).toEqual(requests.map((r) => r.token));

          dropped = proxy.counts.repliesDropped;
          proxy.dropReplyTo(BATCHED_COMPLETION);
          const response = {
            status: 201,
            headers: {},
            body: '{}',
            bodyEncoding: 'json',
            isError: false,
          } as const;
          const stored = await Promise.all(
            leases.map((lease) => store.complete(lease, response, now + 60_000)),
          );
          expect(proxy.counts.repliesDropped).toBe(dropped + 1);
          expect(stored).toEqual([true, true]);
          const records = await direct.getRepository(IdempotencyRecord).findBy({ scope });
          expect(records.map((record) => record.state)).toEqual(['completed', 'completed']);
        } finally {
          await direct.getRepository(IdempotencyRecord).delete({ scope });
          await store.close();
        }
      },
    );
  },
);
