import { Redis } from 'ioredis';
import { randomUUID } from 'node:crypto';
import { DataSource, type DataSourceOptions } from 'typeorm';
import {
  CreateIdempotencyRecords1763900000000,
  IdempotencyRecord,
  IdempotencyRecordsExactIds1767000000000,
  IdempotencyRecordsHotCompletion1768000000000,
  RedisIdempotencyStore,
  TypeOrmIdempotencyStore,
  type ClaimRequest,
  type ClaimResult,
  type IdempotencyStore,
  type Lease,
  type RecordId,
  type RecordInvalidation,
  type StoredResponse,
  type TypeOrmIdempotencyStoreOptions,
} from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { storeContract } from '../lib/testing/index.js';
import { eachDatabase } from './support/databases.js';

/**
 * The kit against the TypeORM store on each of `databases`, built with `options`, on a DataSource
 * with `dataSourceOptions` added. A DataSource given an `entityPrefix` has a table of its own,
 * dropped at the end.
 */
function typeormContract(
  title: string,
  databases: typeof eachDatabase,
  options: TypeOrmIdempotencyStoreOptions = {},
  dataSourceOptions: () => Partial<DataSourceOptions> = () => ({}),
) {
  describe.each(databases)(title, (_name, database) => {
    let dataSource: DataSource;
    let store: TypeOrmIdempotencyStore;
    beforeAll(async () => {
      dataSource = new DataSource({
        ...database.options(),
        ...dataSourceOptions(),
        entities: [IdempotencyRecord],
      } as DataSourceOptions);
      await dataSource.initialize();
      await ensureIdempotencyTable(dataSource);
      store = new TypeOrmIdempotencyStore(dataSource, options);
    });
    afterAll(async () => {
      await store?.close();
      if (dataSource?.isInitialized && dataSource.options.entityPrefix) {
        const runner = dataSource.createQueryRunner();
        await runner.dropTable(dataSource.getMetadata(IdempotencyRecord).tablePath, true);
        const cache = dataSource.options.cache;
        if (typeof cache === 'object' && cache.tableName)
          await runner.dropTable(cache.tableName, true);
        await runner.release();
      }
      await dataSource?.destroy();
    });

    // Behind PgBouncer in transaction mode (no `listenerUrl` here) the store never listens.
    const listens = database.name !== 'pgbouncer-transaction';
    // A LISTEN connection of a loaded CI machine may take more than the kit's default to open.
    const kit = { listens, invalidationTimeoutMs: 10_000 };
    for (const check of storeContract(() => store, kit)) it(check.name, () => check.run());
  });
}

typeormContract('the store contract, TypeORM store on %s', eachDatabase);
// PostgreSQL and PGlite batch their statements by default; the other setting must meet the contract too.
typeormContract(
  'the store contract, TypeORM store on %s without batched statements',
  eachDatabase.filter(([name]) => name === 'pglite' || name === 'postgres'),
  { batchStatements: false },
);

// A table of its own through `entityPrefix`: the migration creates the table the store queries.
typeormContract(
  'the store contract, TypeORM store on %s with an entityPrefix',
  eachDatabase,
  {},
  () => ({ entityPrefix: `p${randomUUID().slice(0, 8)}_` }),
);

// `synchronize: true` must leave the table to the migrations: TypeORM would otherwise create it
// first with its own idea of the columns (MySQL: case-insensitive keys, 64 KiB bodies).
typeormContract(
  'the store contract, TypeORM store on %s with synchronize: true',
  eachDatabase,
  {},
  () => ({ entityPrefix: `s${randomUUID().slice(0, 8)}_`, synchronize: true }),
);

// PGlite is left out: each of its DataSources here is a new in-memory database.
const persistent = eachDatabase.filter(([name]) => name !== 'pglite');
// TypeORM's query cache on for every read (its table made by synchronize): the store's reads of
// its records must not come from it.
typeormContract(
  "the store contract, TypeORM store on %s with TypeORM's query cache always on",
  eachDatabase,
  {},
  () => {
    const entityPrefix = `q${randomUUID().slice(0, 8)}_`;
    return {
      entityPrefix,
      synchronize: true,
      cache: { alwaysEnabled: true, duration: 60_000, tableName: `${entityPrefix}query_cache` },
    };
  },
);

describe.each(persistent)('a DataSource with synchronize: true on %s', (_name, database) => {
  const entityPrefix = `r${randomUUID().slice(0, 8)}_`;
  const open = async (options: DataSourceOptions) => {
    const dataSource = new DataSource(options);
    await dataSource.initialize();
    await ensureIdempotencyTable(dataSource);
    return dataSource;
  };

  it('keeps the stored responses of a table the migration created', async () => {
    const options = {
      ...database.options(),
      entityPrefix,
      entities: [IdempotencyRecord],
    } as DataSourceOptions;
    let dataSource = await open(options);
    try {
      const store = new TypeOrmIdempotencyStore(dataSource);
      const now = Date.now();
      const id = { scope: '', endpoint: 'POST /sync', key: randomUUID() };
      const claim = await store.claim({
        id,
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
      });
      if (!claim.claimed) throw new Error('not claimed');
      const response: StoredResponse = {
        status: 201,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ id: randomUUID() }),
        bodyEncoding: 'json',
        isError: false,
      };
      expect(await store.complete(claim.lease, response, now + 60_000)).toBe(true);
      await store.close();
      await dataSource.destroy();

      // The same database (SQLite: the same file), now with an app DataSource that synchronizes.
      dataSource = await open({ ...options, synchronize: true });
      const again = new TypeOrmIdempotencyStore(dataSource);
      const read = await again.claim({
        id,
        fingerprint: 'fp',
        token: randomUUID(),
        now,
        lockedUntil: now + 60_000,
      });
      await again.close();
      expect(read.claimed).toBe(false);
      expect(!read.claimed && read.record.response).toEqual(response);
    } finally {
      const runner = dataSource.createQueryRunner();
      await runner.dropTable(dataSource.getMetadata(IdempotencyRecord).tablePath, true);
      await runner.release();
      await dataSource.destroy();
    }
  });
});

const mariadb = eachDatabase.find(([name]) => name === 'mariadb')?.[1];
(mariadb ? describe : describe.skip)('the id collation upgrade on MariaDB', () => {
  const database = mariadb!;
  it('upgrades a table made by the first migration: rows kept, ids then compared exactly', async () => {
    // A table of its own, as the first migration made it (utf8mb4_bin: PAD SPACE).
    const dataSource = new DataSource({
      ...database.options(),
      entityPrefix: `u${randomUUID().slice(0, 8)}_`,
      entities: [IdempotencyRecord],
    } as DataSourceOptions);
    await dataSource.initialize();
    const runner = dataSource.createQueryRunner();
    const table = dataSource.getMetadata(IdempotencyRecord).tablePath;
    const collations = async () =>
      (
        (await runner.query(
          `SELECT COLUMN_NAME AS name, COLLATION_NAME AS collation FROM information_schema.COLUMNS
            WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME IN ('scope', 'endpoint', 'idempotency_key')
            ORDER BY COLUMN_NAME`,
          [table],
        )) as { name: string; collation: string }[]
      ).map(({ name, collation }) => `${name} ${collation}`);
    try {
      await new CreateIdempotencyRecords1763900000000().up(runner);
      expect(await collations()).toEqual([
        'endpoint utf8mb4_bin',
        'idempotency_key utf8mb4_bin',
        'scope utf8mb4_bin',
      ]);
      // The columns today's store writes (the purge column); the id collation left as it was.
      await new IdempotencyRecordsHotCompletion1768000000000().up(runner);
      const store = new TypeOrmIdempotencyStore(dataSource);
      const now = Date.now();
      const claim = (id: RecordId, fingerprint = 'fp-a') =>
        store.claim({ id, fingerprint, token: randomUUID(), now, lockedUntil: now + 60_000 });
      const id: RecordId = { scope: 'tenant-a', endpoint: 'POST /charges', key: 'k1' };
      const first = await claim(id);
      if (!first.claimed) throw new Error('not claimed');
      const response: StoredResponse = {
        status: 201,
        headers: {},
        body: JSON.stringify({ owner: 'tenant-a' }),
        bodyEncoding: 'json',
        isError: false,
      };
      expect(await store.complete(first.lease, response, now + 60_000)).toBe(true);
      // The defect on the old table: another tenant's scope, padded, reads tenant-a's record.
      const padded = await claim({ ...id, scope: 'tenant-a ' });
      expect(!padded.claimed && padded.record.response).toEqual(response);

      await new IdempotencyRecordsExactIds1767000000000().up(runner);
      expect(await collations()).toEqual([
        'endpoint utf8mb4_nopad_bin',
        'idempotency_key utf8mb4_nopad_bin',
        'scope utf8mb4_nopad_bin',
      ]);
      // Running it again changes nothing.
      await new IdempotencyRecordsExactIds1767000000000().up(runner);
      const kept = await claim(id);
      expect(!kept.claimed && kept.record.response).toEqual(response);
      for (const other of [
        { ...id, scope: 'tenant-a ' },
        { ...id, key: 'k1 ' },
        { ...id, endpoint: 'POST /charges ' },
      ]) {
        const result = await claim(other, 'fp-b');
        expect(result.claimed && !result.takeover).toBe(true);
      }
      await store.close();
    } finally {
      await runner.dropTable(table, true);
      await runner.release();
      await dataSource.destroy();
    }
  });
});

/**
 * MySQL/MariaDB with TypeORM's `replication`: reads go to a replica by default. The replica here is
 * one that has not caught up at all (a database of its own, with an empty table): the store must
 * read its records on the primary.
 */
(mariadb ? describe : describe.skip)(
  'the store contract, TypeORM store on MariaDB with a lagging replica',
  () => {
    const url = (mariadb?.options() as { url: string } | undefined)?.url ?? '';
    const replicaDatabase = `replica_${randomUUID().slice(0, 8)}`;
    const replicaUrl = url.replace(/\/[^/]*$/, `/${replicaDatabase}`);
    const entityPrefix = `l${randomUUID().slice(0, 8)}_`;
    let dataSource: DataSource;
    let store: TypeOrmIdempotencyStore;
    beforeAll(async () => {
      const replica = new DataSource({ type: 'mariadb', url, entities: [IdempotencyRecord] });
      await replica.initialize();
      await replica.query(`CREATE DATABASE ${replicaDatabase}`);
      await replica.destroy();
      const stale = new DataSource({
        type: 'mariadb',
        url: replicaUrl,
        entityPrefix,
        entities: [IdempotencyRecord],
      });
      await stale.initialize();
      await ensureIdempotencyTable(stale);
      await stale.destroy();
      dataSource = new DataSource({
        type: 'mariadb',
        replication: { master: { url }, slaves: [{ url: replicaUrl }] },
        entityPrefix,
        entities: [IdempotencyRecord],
      });
      await dataSource.initialize();
      await ensureIdempotencyTable(dataSource);
      store = new TypeOrmIdempotencyStore(dataSource);
    });
    afterAll(async () => {
      await store?.close();
      if (dataSource?.isInitialized) {
        const runner = dataSource.createQueryRunner();
        await runner.dropTable(dataSource.getMetadata(IdempotencyRecord).tablePath, true);
        await runner.query(`DROP DATABASE IF EXISTS ${replicaDatabase}`);
        await runner.release();
        await dataSource.destroy();
      }
    });

    for (const check of storeContract(() => store, { invalidationTimeoutMs: 10_000 }))
      it(check.name, () => check.run());
  },
);

describe('the TypeORM store on a DataSource', () => {
  it('that is not initialised yet: refused with a message that says so', async () => {
    const [, database] = eachDatabase[0];
    const dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    expect(() => new TypeOrmIdempotencyStore(dataSource)).toThrow(/not initialised yet/);
  });
});

const redisUrl = process.env.REDIS_URL;
(redisUrl ? describe : describe.skip)('the store contract, Redis store', () => {
  let redis: Redis;
  let store: RedisIdempotencyStore;
  beforeAll(() => {
    redis = new Redis(redisUrl!);
    store = new RedisIdempotencyStore(redis, { prefix: `contract-${process.pid}:` });
  });
  afterAll(async () => {
    await store.close();
    await redis.quit();
  });

  for (const check of storeContract(() => store, {
    expiresByItself: true,
    invalidationTimeoutMs: 10_000,
  }))
    it(check.name, () => check.run());
});

/**
 * The kit must catch broken stores: a naive in-memory store that reads, yields, then writes (so
 * concurrent claims can all win) and never checks the lease token; and variants of it that name
 * records ambiguously or forget the completing claim's token.
 */
describe('the store contract against a broken store', () => {
  class CarelessStore implements IdempotencyStore {
    constructor(
      protected readonly nameOf: (id: RecordId) => string = (id) => JSON.stringify(id),
      private readonly completedToken?: string,
    ) {}

    protected readonly records = new Map<
      string,
      {
        fingerprint: string;
        token: string;
        state: 'in_progress' | 'completed';
        expiresAt: number;
        response: StoredResponse | null;
      }
    >();
    async claim(request: ClaimRequest): Promise<ClaimResult> {
      const name = this.nameOf(request.id);
      const existing = this.records.get(name);
      await new Promise((resolve) => setImmediate(resolve));
      if (existing && existing.expiresAt > request.now) return { claimed: false, record: existing };
      this.records.set(name, {
        fingerprint: request.fingerprint,
        token: request.token,
        state: 'in_progress',
        expiresAt: request.lockedUntil,
        response: null,
      });
      return {
        claimed: true,
        lease: { id: request.id, token: request.token },
        takeover: !!existing,
      };
    }
    async complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
      const record = this.records.get(this.nameOf(lease.id))!;
      this.records.set(this.nameOf(lease.id), {
        ...record,
        token: this.completedToken ?? record.token,
        state: 'completed',
        response,
        expiresAt,
      });
      return true;
    }
    async release(lease: Lease): Promise<boolean> {
      return this.records.delete(this.nameOf(lease.id));
    }
    async renew(): Promise<boolean> {
      return true;
    }
    async purgeExpired(): Promise<number> {
      return 0;
    }
  }
  const checks = storeContract(() => new CarelessStore());
  const failing = [
    'concurrent claims of a key win',
    'fences the lease',
    'keeps a completed record final',
  ];

  it.each(failing)('fails "%s"', async (part) => {
    const check = checks.find((candidate) => candidate.name.includes(part));
    expect(check).toBeDefined();
    await expect(check!.run()).rejects.toThrow();
  });

  it.each([
    [
      'joins the parts of an id with a separator',
      (id: RecordId) => `${id.scope}:${id.endpoint}:${id.key}`,
    ],
    [
      'ignores trailing spaces',
      (id: RecordId) => JSON.stringify(Object.values(id).map((part) => part.trimEnd())),
    ],
    ['ignores case', (id: RecordId) => JSON.stringify(id).toLowerCase()],
  ])('fails the id check of a store that %s', async (_case, nameOf) => {
    const check = storeContract(() => new CarelessStore(nameOf)).find((candidate) =>
      candidate.name.includes('where a separator falls'),
    );
    await expect(check!.run()).rejects.toThrow(/another id/);
  });

  /** Operator deletes and their invalidations, correct or with one flaw. */
  class ListeningStore extends CarelessStore {
    private readonly listeners = new Set<(invalidation: RecordInvalidation) => void>();
    private listening = false;

    constructor(
      private readonly flaw:
        | 'none'
        | 'deletes-any'
        | 'deletes-neighbours'
        | 'synchronous'
        | 'late-listener'
        | 'silent'
        | 'matches-everything'
        | 'unstoppable',
    ) {
      super();
    }

    override async complete(lease: Lease, response: StoredResponse, expiresAt: number) {
      const record = this.records.get(this.nameOf(lease.id));
      if (record?.token !== lease.token || record.state !== 'in_progress') return false;
      return super.complete(lease, response, expiresAt);
    }

    async deleteRecord(id: RecordId, seen: { state: string; token: string }): Promise<boolean> {
      const name = this.nameOf(id);
      const record = this.records.get(name);
      if (!record) return false;
      if (
        this.flaw !== 'deletes-any' &&
        (record.state !== seen.state || record.token !== seen.token)
      )
        return false;
      this.records.delete(name);
      if (this.flaw === 'deletes-neighbours') {
        for (const other of [...this.records.keys()])
          if ((JSON.parse(other) as RecordId).endpoint === id.endpoint) this.records.delete(other);
      }
      if (this.flaw === 'silent') return true;
      const told: RecordInvalidation = {
        all: false,
        matches: (other) => this.flaw === 'matches-everything' || this.nameOf(other) === name,
      };
      // Told a moment later, as a notification from the database arrives.
      setTimeout(() => this.listeners.forEach((listener) => listener(told)), 5);
      return true;
    }

    onInvalidated(listener: (invalidation: RecordInvalidation) => void): () => void {
      this.listeners.add(listener);
      const all = { all: true, listening: true } as const;
      if (this.flaw === 'synchronous') listener(all);
      else if (!this.listening) {
        this.listening = true;
        queueMicrotask(() => this.listeners.forEach((each) => each(all)));
      } else if (this.flaw !== 'late-listener') {
        queueMicrotask(() => this.listeners.has(listener) && listener(all));
      }
      return () => {
        if (this.flaw !== 'unstoppable') this.listeners.delete(listener);
      };
    }
  }

  const invalidationChecks = (store: IdempotencyStore) =>
    storeContract(() => store, { invalidationTimeoutMs: 300 }).filter((check) =>
      /deleteRecord|onInvalidated/.test(check.name),
    );

  it('passes the deleteRecord and onInvalidated checks of a store that keeps their contract', async () => {
    const checks = invalidationChecks(new ListeningStore('none'));
    expect(checks).toHaveLength(3);
    for (const check of checks) await check.run();
  });

  it.each([
    ['deletes a record it was not seen as', 'deletes-any', 'deleteRecord', /another token/],
    ['tells a listener during the call', 'synchronous', 'never synchronously', /during the call/],
    [
      'tells a listener added while listening nothing',
      'late-listener',
      'never synchronously',
      /added while listening/,
    ],
    [
      'goes on telling a stopped listener',
      'unstoppable',
      'stopped listener',
      /stopped listener was told/,
    ],
    ['deletes other records with it', 'deletes-neighbours', 'deleteRecord', /deleted with it/],
    ['tells no listener of a deletion', 'silent', 'never synchronously', /the deleted record/],
    [
      "matches every record in a deletion's invalidation",
      'matches-everything',
      'never synchronously',
      /another record matched/,
    ],
  ] as const)('fails the check of a store that %s', async (_case, flaw, part, message) => {
    const check = invalidationChecks(new ListeningStore(flaw)).find((candidate) =>
      candidate.name.includes(part),
    );
    await expect(check!.run()).rejects.toThrow(message);
  });

  it("fails the token check of a store that forgets the completing claim's token", async () => {
    const check = storeContract(() => new CarelessStore(undefined, '')).find((candidate) =>
      candidate.name.includes("keeps the completing claim's token"),
    );
    await expect(check!.run()).rejects.toThrow(/token of the claim that completed it/);
  });
});
