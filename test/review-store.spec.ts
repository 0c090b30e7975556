import { Redis } from 'ioredis';
import { createCipheriv, createHash, randomBytes, randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DataSource, type DataSourceOptions } from 'typeorm';
import {
  IdempotencyRecord,
  RedisIdempotencyStore,
  TypeOrmIdempotencyStore,
  type ClaimRequest,
  type Lease,
  type RecordId,
  type StoredResponse,
} from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { ResponseSealer } from '../lib/security/response-sealer.js';
import { testDatabases } from './support/databases.js';

const redisUrl = process.env.REDIS_URL;
const mariadbUrl = process.env.MARIADB_URL;
const onRedis = redisUrl ? describe : describe.skip;
const onMariadb = mariadbUrl ? describe : describe.skip;

const id = (): RecordId => ({ scope: 's', endpoint: 'POST /r', key: randomUUID() });
const request = (recordId: RecordId, fingerprint = 'f1', now = Date.now()): ClaimRequest => ({
  id: recordId,
  fingerprint,
  token: randomUUID(),
  now,
  lockedUntil: now + 10_000,
});
const response: StoredResponse = {
  status: 201,
  headers: { 'content-type': 'application/json' },
  body: '{"ok":true}',
  bodyEncoding: 'json',
  isError: false,
};

onRedis('review: Redis store', () => {
  let redis: Redis;
  let store: RedisIdempotencyStore;
  const prefix = `rev-${randomUUID().slice(0, 8)}:`;
  beforeAll(() => {
    redis = new Redis(redisUrl!);
    store = new RedisIdempotencyStore(redis, { prefix });
  });
  afterAll(async () => {
    await store.close();
    redis.disconnect();
  });

  // Was a defect: the service retries a claim whose connection died with the same token ("a claim
  // that finds its own token counts as claimed"); Redis's CLAIM script answered "in progress"
  // against itself (409, key locked for lockTimeout).
  it('a claim retried with its own token counts as claimed (Redis)', async () => {
    const claim = request(id());
    expect((await store.claim(claim)).claimed).toBe(true);
    expect((await store.claim(claim)).claimed).toBe(true);
  });

  // Was a gap: no leaseState on Redis, so a complete() retried after a lost answer was logged and
  // counted as a lost lease although the response was stored.
  it('has leaseState, so a retried completion whose first answer was lost is recognised', async () => {
    const claim = request(id());
    const result = await store.claim(claim);
    if (!result.claimed) throw new Error('not claimed');
    expect(await store.complete(result.lease, response, Date.now() + 60_000)).toBe(true);
    expect(await store.complete(result.lease, response, Date.now() + 60_000)).toBe(false);
    expect(await store.leaseState!(result.lease)).toBe('completed');
    expect(await store.leaseState!({ ...result.lease, token: 'another' })).toBe('taken');
  });

  it('works with a client keyPrefix plus the store prefix: keys, replay and wake-ups', async () => {
    const prefixed = new Redis(redisUrl!, { keyPrefix: 'kp:' });
    const prefixedStore = new RedisIdempotencyStore(prefixed, { prefix });
    try {
      const recordId = id();
      const claimed = await prefixedStore.claim(request(recordId));
      if (!claimed.claimed) throw new Error('not claimed');
      const key = `kp:${prefix}${JSON.stringify([recordId.scope, recordId.endpoint, recordId.key])}`;
      expect(await redis.exists(key)).toBe(1);
      const watch = prefixedStore.watch(recordId)!;
      const deadline = Date.now() + 3000;
      while (!watch.live && Date.now() < deadline) await watch.changed(50);
      expect(watch.live).toBe(true);
      const woken = watch.changed(5000).then(() => Date.now());
      const started = Date.now();
      const lease: Lease = { ...claimed.lease, watched: true };
      expect(await prefixedStore.complete(lease, response, Date.now() + 60_000)).toBe(true);
      expect((await woken) - started).toBeLessThan(2000);
      watch.close();
      const replay = await prefixedStore.claim(request(recordId));
      expect(replay.claimed).toBe(false);
      if (!replay.claimed) {
        expect(replay.record.state).toBe('completed');
        expect(replay.record.token).toBe(claimed.lease.token);
        expect(replay.record.response?.body).toBe(response.body);
      }
    } finally {
      await prefixedStore.close();
      prefixed.disconnect();
    }
  });
});

onMariadb('review: exact-ids migration on MariaDB', () => {
  it('runs concurrently from three processes and twice, on a table with rows, keeping them', async () => {
    const entityPrefix = `rv${randomUUID().slice(0, 8)}_`;
    const sources = [0, 1, 2].map(
      () =>
        new DataSource({
          type: 'mariadb',
          url: mariadbUrl,
          entityPrefix,
          entities: [IdempotencyRecord],
        } as DataSourceOptions),
    );
    await Promise.all(sources.map((source) => source.initialize()));
    const table = `${entityPrefix}idempotency_records`;
    try {
      await ensureIdempotencyTable(sources[0]);
      // Back to what 0.2 left: PAD SPACE ids and a text body, with rows in it.
      await sources[0].query(
        `ALTER TABLE ${table} MODIFY scope varchar(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, MODIFY endpoint varchar(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, MODIFY idempotency_key varchar(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, MODIFY response_body text NULL`,
      );
      const store = new TypeOrmIdempotencyStore(sources[0]);
      for (const key of ['k1', 'k2', 'k3']) {
        const claim = await store.claim(request({ scope: '', endpoint: 'POST /m', key }));
        if (claim.claimed) await store.complete(claim.lease, response, Date.now() + 60_000);
      }
      await Promise.all(sources.map((source) => ensureIdempotencyTable(source)));
      await Promise.all(sources.map((source) => ensureIdempotencyTable(source)));
      const columns = (await sources[1].query(
        `SELECT COLUMN_NAME AS name, COLLATION_NAME AS collation, DATA_TYPE AS type FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?`,
        [table],
      )) as { name: string; collation: string | null; type: string }[];
      for (const name of ['scope', 'endpoint', 'idempotency_key'])
        expect(columns.find((column) => column.name === name)?.collation).toBe('utf8mb4_nopad_bin');
      expect(columns.find((column) => column.name === 'response_body')?.type).toBe('longtext');
      const [{ count }] = await sources[1].query(`SELECT COUNT(*) AS count FROM ${table}`);
      expect(Number(count)).toBe(3);
      const spaced = await new TypeOrmIdempotencyStore(sources[2]).claim(
        request({ scope: '', endpoint: 'POST /m', key: 'k1 ' }),
      );
      expect(spaced.claimed).toBe(true);
      await store.close();
    } finally {
      await sources[0].query(`DROP TABLE IF EXISTS ${table}`);
      await Promise.all(sources.map((source) => source.destroy()));
    }
  }, 60_000);
});

describe('review: sealed responses', () => {
  const keyA = randomBytes(32);
  const keyB = randomBytes(32);

  it('rotation: sealed under A opens under [B, A], not under [B]', () => {
    const record = { id: id(), fingerprint: 'f', token: randomUUID() };
    const sealed = new ResponseSealer({ keys: [keyA] }).seal(record, response);
    expect(new ResponseSealer({ keys: [keyB, keyA] }).open(record, sealed)).toEqual(response);
    expect(() => new ResponseSealer({ keys: [keyB] }).open(record, sealed)).toThrow(
      /not configured/,
    );
  });

  it('v1 envelopes: opened only with acceptV1Envelopes, under a rotated key list; a v2 relabelled v1 does not open', () => {
    const record = { id: id(), fingerprint: 'f', token: randomUUID() };
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', keyA, iv);
    cipher.setAAD(
      Buffer.from(
        JSON.stringify([
          'nestjs-idempotency/v1',
          record.id.scope,
          record.id.endpoint,
          record.id.key,
          201,
          false,
        ]),
      ),
    );
    const plain = JSON.stringify({ h: response.headers, b: response.body, e: 'json' });
    const ct = Buffer.concat([cipher.update(plain, 'utf8'), cipher.final()]);
    const keyId = createHash('sha256').update(keyA).digest('hex').slice(0, 16);
    const v1: StoredResponse = {
      status: 201,
      headers: {},
      body: [
        'v1',
        keyId,
        iv.toString('base64url'),
        ct.toString('base64url'),
        cipher.getAuthTag().toString('base64url'),
      ].join('.'),
      bodyEncoding: 'sealed',
      isError: false,
    };
    expect(() => new ResponseSealer({ keys: [keyB, keyA] }).open(record, v1)).toThrow(/v1/);
    expect(
      new ResponseSealer({ keys: [keyB, keyA], acceptV1Envelopes: true }).open(record, v1),
    ).toEqual(response);
    const v2 = new ResponseSealer({ keys: [keyA] }).seal(record, response);
    const relabelled = { ...v2, body: `v1${v2.body!.slice(2)}` };
    expect(() =>
      new ResponseSealer({ keys: [keyA], acceptV1Envelopes: true }).open(record, relabelled),
    ).toThrow(/authenticate/);
  });

  describe.each(['sqlite', 'pglite'] as const)('on %s', (kind) => {
    let dataSource: DataSource;
    let store: TypeOrmIdempotencyStore;
    beforeAll(async () => {
      const database = testDatabases.find((candidate) => candidate.name === kind)!;
      dataSource = new DataSource({
        ...database.options(),
        entities: [IdempotencyRecord],
      } as DataSourceOptions);
      await dataSource.initialize();
      await ensureIdempotencyTable(dataSource);
      store = new TypeOrmIdempotencyStore(dataSource);
    });
    afterAll(async () => {
      await store.close();
      await dataSource.destroy();
    });

    it('a response sealed after a takeover opens with the token the store returns; the old one does not', async () => {
      const sealer = new ResponseSealer({ keys: [keyA] });
      const recordId = id();
      const past = Date.now() - 100_000;
      const first = await store.claim({ ...request(recordId, 'f', past), lockedUntil: past + 1 });
      if (!first.claimed) throw new Error('not claimed');
      const oldSealed = sealer.seal(
        { id: recordId, fingerprint: 'f', token: first.lease.token },
        response,
      );
      const second = await store.claim(request(recordId, 'f'));
      if (!second.claimed) throw new Error('not taken over');
      expect(second.takeover).toBe(true);
      expect(await store.complete(first.lease, oldSealed, Date.now() + 60_000)).toBe(false);
      const sealed = sealer.seal(
        { id: recordId, fingerprint: 'f', token: second.lease.token },
        response,
      );
      expect(await store.complete(second.lease, sealed, Date.now() + 60_000)).toBe(true);
      const replay = await store.claim(request(recordId, 'f'));
      if (replay.claimed) throw new Error('claimed again');
      const record = {
        id: recordId,
        fingerprint: replay.record.fingerprint,
        token: replay.record.token,
      };
      expect(sealer.open(record, replay.record.response!)).toEqual(response);
      expect(() => sealer.open(record, oldSealed)).toThrow(/authenticate/);
    });

    it('30 concurrent (batched) completions each replay and open under their own token', async () => {
      const sealer = new ResponseSealer({ keys: [keyA] });
      const ids = Array.from({ length: 30 }, id);
      const claims = await Promise.all(
        ids.map((recordId) => store.claim(request(recordId, `f-${recordId.key}`))),
      );
      await Promise.all(
        claims.map((claim, index) => {
          if (!claim.claimed) throw new Error('not claimed');
          const sealed = sealer.seal(
            { id: ids[index], fingerprint: `f-${ids[index].key}`, token: claim.lease.token },
            response,
          );
          return store.complete(claim.lease, sealed, Date.now() + 60_000);
        }),
      );
      const replays = await Promise.all(
        ids.map((recordId) => store.claim(request(recordId, `f-${recordId.key}`))),
      );
      replays.forEach((replay, index) => {
        if (replay.claimed) throw new Error('claimed again');
        expect(
          sealer.open(
            { id: ids[index], fingerprint: replay.record.fingerprint, token: replay.record.token },
            replay.record.response!,
          ),
        ).toEqual(response);
      });
    });
  });
});

describe('review: one SQLite file under two DataSources (two connections)', () => {
  it('of 20 concurrent claims split over both, exactly one wins; the other sees it completed', async () => {
    const file = join(tmpdir(), `rev-${randomUUID()}.sqlite`);
    const sources = [0, 1].map(
      () =>
        new DataSource({
          type: 'better-sqlite3',
          database: file,
          entities: [IdempotencyRecord],
        } as DataSourceOptions),
    );
    for (const source of sources) {
      await source.initialize();
      await ensureIdempotencyTable(source);
    }
    const stores = sources.map((source) => new TypeOrmIdempotencyStore(source));
    try {
      const recordId = id();
      const results = await Promise.all(
        Array.from({ length: 20 }, (_, index) => stores[index % 2].claim(request(recordId))),
      );
      const winners = results.filter((result) => result.claimed);
      expect(winners).toHaveLength(1);
      const winner = winners[0];
      if (!winner.claimed) throw new Error('impossible');
      const owner = results.indexOf(winner) % 2;
      expect(await stores[owner].complete(winner.lease, response, Date.now() + 60_000)).toBe(true);
      const replay = await stores[1 - owner].claim(request(recordId));
      expect(replay.claimed).toBe(false);
      if (!replay.claimed) expect(replay.record.state).toBe('completed');
    } finally {
      for (const store of stores) await store.close();
      for (const source of sources) await source.destroy();
    }
  });
});
