import { randomBytes } from 'node:crypto';
import { downstreamKeyOf, IdempotencyMetrics, SEALED_ENCODING } from '../lib/index.js';
import { fingerprintRequest } from '../lib/utils/fingerprint.js';
import { recordsOf, stealClaim } from './fixtures/fixture-app.js';
import {
  createLedgerTable,
  TransactionalLeaseController,
  LedgerEntry,
  LedgerService,
  ledgerOf,
  SHORT_LOCK_MS,
} from './fixtures/lease.controller.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';
import { waitFor } from './support/reliability.js';

const transactionalDatabases = eachDatabase.filter(([, database]) => database.transactions);
const serverDatabases = transactionalDatabases.filter(
  ([, database]) => !database.ownTablePerConnection,
);
const settings = {
  controllers: [TransactionalLeaseController],
  providers: [LedgerService],
  entities: [LedgerEntry],
};

describe.each(transactionalDatabases)(
  'transactional mode with encryption on %s',
  (_name, database) => {
    let fixture: ReliabilityApp;
    beforeAll(async () => {
      fixture = await createReliabilityApp(
        database,
        { encryption: { keys: [randomBytes(32)] } },
        settings,
      );
      await createLedgerTable(fixture.dataSource);
    });
    afterAll(() => fixture.close());

    it('commits the sealed response with the handler’s write, and replays it', async () => {
      const key = newKey();
      const first = await post(fixture.baseUrl, '/lease/tx', key, { amount: 31 });
      expect(first.status).toBe(201);
      const [record] = await recordsOf(fixture.dataSource, key);
      expect(record.responseBodyEncoding).toBe(SEALED_ENCODING);
      expect(record.responseBody).not.toContain(String(first.body.entry));
      const retry = await post(fixture.baseUrl, '/lease/tx', key, { amount: 31 });
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(1);
    });
  },
);

describe.each(transactionalDatabases)('transactional mode on %s', (_name, database) => {
  let fixture: ReliabilityApp;
  const log = new CapturedLog();
  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      { maxResponseBytes: 10_000 },
      { ...settings, logger: log },
    );
    await createLedgerTable(fixture.dataSource);
  });
  afterAll(() => fixture.close());

  it('commits the handler’s write and the stored response together; a retry replays, nothing is written twice', async () => {
    const key = newKey();
    const first = await post(fixture.baseUrl, '/lease/tx', key, { amount: 12 });
    expect(first.status).toBe(201);
    const ledger = await ledgerOf(fixture.dataSource, key);
    expect(ledger.map((entry) => entry.id)).toEqual([first.body.entry]);
    expect(ledger[0].amount).toBe(12);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(record.state).toBe('completed');
    expect(JSON.parse(record.responseBody!)).toEqual(first.body);

    const retry = await post(fixture.baseUrl, '/lease/tx', key, { amount: 12 });
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(1);
    expect(fixture.calls.count('tx', key)).toBe(1);
  });

  it('a stored business error (402) rolls the handler’s writes back and replays the 402', async () => {
    const key = newKey();
    const first = await post(fixture.baseUrl, '/lease/tx-declined', key);
    expect(first.status).toBe(402);
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    const retry = await post(fixture.baseUrl, '/lease/tx-declined', key);
    expect(retry.status).toBe(402);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(fixture.calls.count('tx-declined', key)).toBe(1);
  });

  it('a crash (500) rolls the writes back and releases the key: the retry runs against a clean slate', async () => {
    const key = newKey();
    expect((await post(fixture.baseUrl, '/lease/tx-crash', key)).status).toBe(500);
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    expect((await post(fixture.baseUrl, '/lease/tx-crash', key)).status).toBe(500);
    expect(fixture.calls.count('tx-crash', key)).toBe(2);
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
  });

  it('a handler’s own 503 after its gateway refused the connection is its answer, not the store’s: rolled back, released, nothing blamed on the database', async () => {
    const key = newKey();
    const first = await post(fixture.baseUrl, '/lease/tx-gateway-down', key);
    expect(first.status).toBe(503);
    expect(first.headers['content-type']).toMatch(/^application\/json/);
    expect(first.body).toMatchObject({ message: 'the payment gateway is unreachable' });
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    // Released by the policy (a 5xx is not stored): the retry runs the handler again.
    expect((await post(fixture.baseUrl, '/lease/tx-gateway-down', key)).status).toBe(503);
    expect(fixture.calls.count('tx-gateway-down', key)).toBe(2);
    expect(log.lines.filter((line) => /database connection/.test(line.text))).toEqual([]);
  });

  it('a network error the handler lets through is its crash (500), as in the plain mode, not the store’s', async () => {
    const key = newKey();
    const first = await post(fixture.baseUrl, '/lease/tx-gateway-down', key, { raw: true });
    expect(first.status).toBe(500);
    expect(first.body.type).not.toBe('tag:nestjs-idempotency,2026:store-unavailable');
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    expect(log.lines.filter((line) => /database connection/.test(line.text))).toEqual([]);
  });

  it('a result that cannot be stored (over maxResponseBytes) commits nothing: 500 result-not-stored, key released', async () => {
    const key = newKey();
    expectProblem(await post(fixture.baseUrl, '/lease/tx-big', key), 500, 'result-not-stored');
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
  });

  it('hands the handler its operation and stable downstream keys', async () => {
    const key = newKey();
    const first = await post(fixture.baseUrl, '/lease/tx', key, { amount: 3 });
    const fingerprint = fingerprintRequest({
      method: 'POST',
      url: '/lease/tx',
      body: { amount: 3 },
    });
    // Derived from the operation alone: any process computes the same key for it.
    expect(first.body.downstream).toBe(
      downstreamKeyOf(
        { scope: '', endpoint: 'POST /lease/tx', key, fingerprint, entityManager: undefined },
        'gateway',
      ),
    );
    expect(first.body.downstream).toMatch(
      /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/,
    );
  });
});

describe.each(serverDatabases)('transactional mode with a lost lease on %s', (_name, database) => {
  let fixture: ReliabilityApp;
  beforeAll(async () => {
    fixture = await createReliabilityApp(database, {}, settings);
    await createLedgerTable(fixture.dataSource);
  });
  afterAll(() => fixture.close());

  it('a duplicate during a long transaction gets 409, and the handler runs once', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/tx', key).then((response) => response);
    await fixture.gate.arrived(key);
    const until = Date.now() + 4 * SHORT_LOCK_MS;
    const statuses: number[] = [];
    while (Date.now() < until)
      statuses.push((await post(fixture.baseUrl, '/lease/tx', key)).status);
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
    expect(new Set(statuses)).toEqual(new Set([409]));
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(1);
    expect(fixture.calls.count('tx', key)).toBe(1);
  });

  it('rolls the handler’s writes back when the claim was taken over before completion: 409 lease-lost', async () => {
    const key = newKey();
    const lost = () => fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost'];
    const lostBefore = lost();
    fixture.gate.hold(key);
    const first = post(fixture.baseUrl, '/lease/tx', key).then((response) => response);
    await fixture.gate.arrived(key);
    // Another process took the key over (a new lease token), as after a stall longer than lockTimeout.
    const thief = await stealClaim(fixture.dataSource, key);
    await waitFor('the renewal to find the lease gone', () =>
      lost() > lostBefore ? true : undefined,
    );
    fixture.gate.open(key);
    const response = await first;
    expectProblem(response, 409, 'lease-lost');
    expect(response.headers['retry-after']).toBe('1');
    expect(await ledgerOf(fixture.dataSource, key)).toHaveLength(0);
    expect(lost()).toBe(lostBefore + 1);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(record.state).toBe('in_progress');
    expect(record.leaseToken).toBe(thief);
  });
});

const sqliteRow = eachDatabase.find(([name]) => name === 'sqlite');

// Absent only when TEST_DATABASES leaves SQLite out (the Node matrix of .ci/node-matrix).
(sqliteRow ? describe : describe.skip)('transactional mode on SQLite', () => {
  const sqlite = sqliteRow?.[1] as (typeof eachDatabase)[number][1];

  it('is refused at startup with a message that says what to use', async () => {
    await expect(createReliabilityApp(sqlite, {}, settings)).rejects.toThrow(
      /transactional routes \(TransactionalLeaseController\.tx, .*\) cannot run on this store: TypeORM's better-sqlite3 driver shares one connection/,
    );
  });

  it('non-transactional routes still run there', async () => {
    const fixture = await createReliabilityApp(sqlite, {});
    try {
      expect((await post(fixture.baseUrl, '/r/ok', newKey())).status).toBe(201);
    } finally {
      await fixture.close();
    }
  });
});

describe('downstream keys', () => {
  const operation = {
    scope: 'tenant-a',
    endpoint: 'POST /payments',
    key: 'k-1',
    fingerprint: 'f'.repeat(64),
    entityManager: undefined,
  };

  it('are the same for the same operation and call name, different for any other', () => {
    const charge = downstreamKeyOf(operation, 'charge');
    expect(downstreamKeyOf({ ...operation }, 'charge')).toBe(charge);
    const others = [
      downstreamKeyOf(operation, 'receipt'),
      downstreamKeyOf({ ...operation, key: 'k-2' }, 'charge'),
      downstreamKeyOf({ ...operation, scope: 'tenant-b' }, 'charge'),
      downstreamKeyOf({ ...operation, endpoint: 'POST /refunds' }, 'charge'),
      downstreamKeyOf({ ...operation, fingerprint: 'e'.repeat(64) }, 'charge'),
    ];
    expect(new Set([charge, ...others]).size).toBe(6);
  });
});
