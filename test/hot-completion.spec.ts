import { randomUUID } from 'node:crypto';
import {
  DataSource,
  type DataSourceOptions,
  type MigrationInterface,
  type QueryRunner,
} from 'typeorm';
import {
  CreateIdempotencyRecords1763900000000,
  IdempotencyRecord,
  IdempotencyRecordsExactIds1767000000000,
  IdempotencyRecordsHotCompletion1768000000000,
  TypeOrmIdempotencyStore,
  type RecordId,
  type StoredResponse,
} from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { qualifiedTable } from '../lib/storage/typeorm/store-dialect.js';
import { eachDatabase } from './support/databases.js';

const databases = eachDatabase.filter(([name]) =>
  ['postgres', 'pglite', 'sqlite', 'mariadb'].includes(name),
);

const response: StoredResponse = {
  status: 201,
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ id: 'order-1' }),
  bodyEncoding: 'json',
  isError: false,
};

describe.each(databases)('the HOT-completion migration on %s', (name, database) => {
  const postgres = name === 'postgres' || name === 'pglite';
  let dataSource: DataSource;
  let tablePath: string;
  let table: string;

  beforeEach(async () => {
    dataSource = new DataSource({
      ...database.options(),
      entityPrefix: `h${randomUUID().slice(0, 8)}_`,
      entities: [IdempotencyRecord],
    } as DataSourceOptions);
    await dataSource.initialize();
    tablePath = dataSource.getMetadata(IdempotencyRecord).tablePath;
    table = qualifiedTable(dataSource, tablePath);
  });
  afterEach(async () => {
    await on((runner) => runner.dropTable(tablePath, true));
    await dataSource.destroy();
  });

  /** Runs `work` on a query runner of its own (PGlite's driver lends one at a time). */
  const on = async <T>(work: (runner: QueryRunner) => Promise<T>): Promise<T> => {
    const runner = dataSource.createQueryRunner();
    try {
      return await work(runner);
    } finally {
      await runner.release();
    }
  };
  const migrate = (migration: MigrationInterface, direction: 'up' | 'down' = 'up') =>
    on((runner) => migration[direction](runner));

  /** The table's columns and indexes, as the database reports them. */
  const shape = async () => {
    const current = (await on((runner) => runner.getTable(tablePath)))!;
    return {
      purgeColumn: current.columns.some((column) => column.name === 'purge_at'),
      indexes: current.indices.map((index) => index.columnNames.join(',')).sort(),
    };
  };
  const fillfactor = async () =>
    (
      (await dataSource.query(`SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)`, [
        table,
      ])) as { reloptions: string[] | null }[]
    )[0].reloptions;

  /** A completed row as 0.1 wrote it (no purge_at). */
  const insertOldRow = (key: string, expiresAt: number) => {
    const marks = Array.from({ length: 12 }, (_, i) => (postgres ? `$${i + 1}` : '?')).join(', ');
    return dataSource.query(
      `INSERT INTO ${table} (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
        expires_at, created_at, response_status, response_headers, response_body, response_body_encoding)
        VALUES (${marks})`,
      [
        '',
        'POST /orders',
        key,
        'fp',
        'completed',
        randomUUID(),
        expiresAt,
        expiresAt - 3_600_000,
        response.status,
        JSON.stringify(response.headers),
        response.body,
        response.bodyEncoding,
      ],
    );
  };
  const keys = async () =>
    (
      (await dataSource.query(`SELECT idempotency_key FROM ${table} ORDER BY idempotency_key`)) as {
        idempotency_key: string;
      }[]
    ).map((row) => row.idempotency_key);

  it("upgrades 0.1's table: its rows kept and purged by expiry; down gives back 0.1's table", async () => {
    await migrate(new CreateIdempotencyRecords1763900000000());
    await migrate(new IdempotencyRecordsExactIds1767000000000());
    const old = await shape();
    expect(old).toEqual({ purgeColumn: false, indexes: ['expires_at'] });
    const now = Date.now();
    await insertOldRow('live', now + 3_600_000);
    await insertOldRow('expired', now - 1000);

    await migrate(new IdempotencyRecordsHotCompletion1768000000000());
    // Twice, as every startup runs it.
    await migrate(new IdempotencyRecordsHotCompletion1768000000000());
    expect(await shape()).toEqual({ purgeColumn: true, indexes: ['purge_at'] });
    if (name === 'postgres' || name === 'pglite')
      expect(await fillfactor()).toEqual(['fillfactor=70']);

    const store = new TypeOrmIdempotencyStore(dataSource);
    try {
      const live: RecordId = { scope: '', endpoint: 'POST /orders', key: 'live' };
      const replay = await store.claim({
        id: live,
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
      });
      expect(!replay.claimed && replay.record.response).toEqual(response);
      // 0.1's rows have purge_at 0: the purge deletes the expired one only.
      expect(await store.purgeExpired(now, 100)).toBe(1);
      expect(await keys()).toEqual(['live']);
      expect(await store.purgeExpired(now, 100)).toBe(0);

      // A new record: claimed, completed, replayed on the upgraded table.
      const fresh: RecordId = { scope: '', endpoint: 'POST /orders', key: 'new' };
      const claim = await store.claim({
        id: fresh,
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
        ttlMs: 3_600_000,
      });
      if (!claim.claimed) throw new Error('not claimed');
      expect(await store.complete(claim.lease, response, now + 3_600_000)).toBe(true);
      const again = await store.claim({
        id: fresh,
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
      });
      expect(!again.claimed && again.record.response).toEqual(response);
      // Expired: purged, whether its purge_at was right (new) or moved up by a purge (live).
      expect(await store.purgeExpired(now + 3_600_001, 100)).toBe(2);
      expect(await keys()).toEqual([]);
    } finally {
      await store.close();
    }

    await insertOldRow('kept', now + 3_600_000);
    await migrate(new IdempotencyRecordsHotCompletion1768000000000(), 'down');
    expect(await shape()).toEqual(old);
    if (name === 'postgres' || name === 'pglite') expect(await fillfactor()).toBeNull();
    expect(await keys()).toEqual(['kept']);
    // A 0.1 app writes its rows again.
    await insertOldRow('old-app', now + 3_600_000);
    expect(await keys()).toEqual(['kept', 'old-app']);
  });

  it('a purge that finds records completed after their claim moves them, and deletes them once expired', async () => {
    await ensureIdempotencyTable(dataSource);
    const store = new TypeOrmIdempotencyStore(dataSource);
    try {
      const now = Date.now();
      // Claimed without the TTL hint: purge_at is the lock's end, then the completion extends
      // expires_at past it.
      for (let i = 0; i < 7; i++) {
        const claim = await store.claim({
          id: { scope: '', endpoint: 'POST /orders', key: `k${i}` },
          fingerprint: 'fp',
          token: randomUUID(),
          now,
          lockedUntil: now + 1000,
        });
        if (!claim.claimed) throw new Error('not claimed');
        expect(await store.complete(claim.lease, response, now + (i < 3 ? 2000 : 60_000))).toBe(
          true,
        );
      }
      // Past the locks, before any TTL: nothing deleted.
      expect(await store.purgeExpired(now + 1500, 2)).toBe(0);
      // Past three TTLs: those three, in batches of 2, the other four kept.
      expect(await store.purgeExpired(now + 2500, 2)).toBe(2);
      expect(await store.purgeExpired(now + 2500, 2)).toBe(1);
      expect(await keys()).toEqual(['k3', 'k4', 'k5', 'k6']);
      expect(await store.purgeExpired(now + 60_000, 10)).toBe(4);
    } finally {
      await store.close();
    }
  });

  it('a record the purge deferred while it ran (its TTL shorter than its run) is purged at its TTL after its completion, not at its lock’s end', async () => {
    await ensureIdempotencyTable(dataSource);
    const store = new TypeOrmIdempotencyStore(dataSource);
    try {
      const now = Date.now();
      // TTL 1 s, lock 60 s: purge_at is the claim's TTL end, now + 1 s.
      const claims = [];
      for (const key of ['slow', 'slow-batched-1', 'slow-batched-2']) {
        const claim = await store.claim({
          id: { scope: '', endpoint: 'POST /orders', key },
          fingerprint: 'fp',
          token: randomUUID(),
          now,
          lockedUntil: now + 60_000,
          ttlMs: 1000,
        });
        if (!claim.claimed) throw new Error('not claimed');
        claims.push(claim.lease);
      }
      // Still running past its TTL: the purge defers it (to its lock's end), deletes nothing.
      expect(await store.purgeExpired(now + 1500, 10)).toBe(0);
      expect(await keys()).toEqual(['slow', 'slow-batched-1', 'slow-batched-2']);
      // Completed at now + 2 s with a TTL of 1 s: one alone, two at once (one batch on PostgreSQL).
      expect(await store.complete(claims[0], response, now + 3000)).toBe(true);
      expect(
        await Promise.all(
          claims.slice(1).map((lease) => store.complete(lease, response, now + 3000)),
        ),
      ).toEqual([true, true]);
      // Before its TTL's end: kept, and replayed.
      expect(await store.purgeExpired(now + 2500, 10)).toBe(0);
      // After it: deleted, 57 s before the lock it was deferred to would have ended.
      expect(await store.purgeExpired(now + 3500, 10)).toBe(3);
      expect(await keys()).toEqual([]);
    } finally {
      await store.close();
    }
  });
});

const postgresDatabase = eachDatabase.find(([name]) => name === 'postgres')?.[1];
(postgresDatabase ? describe : describe.skip)('HOT completions on PostgreSQL', () => {
  /**
   * Claims, renews and completes `count` fresh keys one after the other on a table of its own,
   * with an extra index on `expires_at` (0.1's purge index) when `expiresAtIndex`; returns what
   * PostgreSQL counted of the table's updates once the store's connections closed (a backend
   * reports its counts when it exits).
   */
  async function updatesOf(expiresAtIndex: boolean, count: number) {
    const options = {
      ...postgresDatabase!.options(),
      entityPrefix: `hot${randomUUID().slice(0, 8)}_`,
      entities: [IdempotencyRecord],
    } as DataSourceOptions;
    const dataSource = new DataSource(options);
    await dataSource.initialize();
    await ensureIdempotencyTable(dataSource);
    const tablePath = dataSource.getMetadata(IdempotencyRecord).tablePath;
    const table = qualifiedTable(dataSource, tablePath);
    if (expiresAtIndex)
      await dataSource.query(`CREATE INDEX "${tablePath}_expires" ON ${table} (expires_at)`);
    const store = new TypeOrmIdempotencyStore(dataSource);
    const now = Date.now();
    const renewed: boolean[] = [];
    const completed: boolean[] = [];
    for (let i = 0; i < count; i++) {
      const claim = await store.claim({
        id: { scope: '', endpoint: 'POST /orders', key: `k${i}` },
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
        ttlMs: 3_600_000,
      });
      if (!claim.claimed) throw new Error('not claimed');
      renewed.push(await store.renew(claim.lease, now + 120_000));
      completed.push(await store.complete(claim.lease, response, now + 3_600_000));
    }
    await store.close();
    await dataSource.destroy();
    expect(renewed.filter(Boolean)).toHaveLength(count);
    expect(completed.filter(Boolean)).toHaveLength(count);

    const admin = new DataSource(postgresDatabase!.options());
    await admin.initialize();
    try {
      const read = async () =>
        (
          (await admin.query(
            `SELECT n_tup_upd::int AS updates, n_tup_hot_upd::int AS hot FROM pg_stat_user_tables WHERE relid = to_regclass($1)`,
            [table],
          )) as { updates: number; hot: number }[]
        )[0];
      const deadline = Date.now() + 15_000;
      let stats = await read();
      while (stats.updates < 2 * count && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        stats = await read();
      }
      return stats;
    } finally {
      await admin.query(`DROP TABLE IF EXISTS ${table}`);
      await admin.destroy();
    }
  }

  it('the completion and the renewal change no index: HOT updates (pg_stat_user_tables.n_tup_hot_upd)', async () => {
    const count = 200;
    const hot = await updatesOf(false, count);
    // Every update HOT: the fillfactor leaves each page the room for the renewed and the
    // completed version of the rows inserted into it (no pruning needed).
    expect(hot).toEqual({ updates: 2 * count, hot: 2 * count });

    // The same with 0.1's purge index on expires_at: no update is HOT.
    const indexed = await updatesOf(true, count);
    expect(indexed.updates).toBe(2 * count);
    expect(indexed.hot).toBe(0);
  }, 60_000);
});
