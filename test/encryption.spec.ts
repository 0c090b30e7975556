import { Redis } from 'ioredis';
import { createCipheriv, createHash, randomBytes, randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  IdempotencyMetrics,
  IdempotencyRecord,
  RedisIdempotencyStore,
  SEALED_ENCODING,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachDatabase, type TestDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

const oldKey = randomBytes(32).toString('base64');
const newKeyHex = randomBytes(32).toString('hex');

describe.each(eachDatabase)('encrypted responses on %s', (_name, database) => {
  let dataSource: DataSource;
  const apps: FixtureApp[] = [];
  const log = new CapturedLog();

  /** An app on the shared DataSource, with these options. */
  async function app(options: Partial<IdempotencyModuleOptions>): Promise<FixtureApp> {
    const fixture = await createFixtureApp(database, options, 'express', {
      dataSource,
      logger: log,
    });
    apps.push(fixture);
    return fixture;
  }

  beforeAll(async () => {
    dataSource = await openShared(database);
  });
  afterAll(async () => {
    for (const fixture of apps) await fixture.close();
    await dataSource.destroy();
  });

  it('stores bodies and headers sealed, and replays them as they were', async () => {
    const fixture = await app({ encryption: { keys: [oldKey] } });
    const key = newKey();
    const first = await post(fixture.http, '/charges', key, { amount: 4242 }).expect(201);
    const [record] = await recordsOf(dataSource, key);
    expect(record.responseBodyEncoding).toBe(SEALED_ENCODING);
    expect(record.responseHeaders).toBe('{}');
    expect(record.responseBody).not.toContain('4242');
    expect(record.responseBody).not.toContain(first.body.id);
    expect(record.responseStatus).toBe(201);

    const retry = await post(fixture.http, '/charges', key, { amount: 4242 }).expect(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    expect(retry.headers['content-type']).toBe(first.headers['content-type']);
    expect(fixture.calls.count('charges', key)).toBe(1);
  });

  it('seals stored errors and binary bodies too', async () => {
    const fixture = await app({ encryption: { keys: [oldKey] } });
    const declined = newKey();
    const first = await post(fixture.http, '/declined', declined).expect(402);
    const retry = await post(fixture.http, '/declined', declined).expect(402);
    expect(retry.body).toEqual(first.body);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    const [record] = await recordsOf(dataSource, declined);
    expect(record.responseBodyEncoding).toBe(SEALED_ENCODING);
    expect(record.responseIsError).toBe(true);
  });

  it('rotates: a new first key seals, every listed key opens, a removed key fails closed', async () => {
    const before = await app({ encryption: { keys: [oldKey] } });
    const key = newKey();
    const first = await post(before.http, '/charges', key, { amount: 1 }).expect(201);
    const sealedUnderOld = (await recordsOf(dataSource, key))[0].responseBody!;

    const rotated = await app({ encryption: { keys: [newKeyHex, oldKey] } });
    const replay = await post(rotated.http, '/charges', key, { amount: 1 }).expect(201);
    expect(replay.body).toEqual(first.body);
    const fresh = newKey();
    await post(rotated.http, '/charges', fresh, { amount: 2 }).expect(201);
    const sealedUnderNew = (await recordsOf(dataSource, fresh))[0].responseBody!;
    expect(keyIdOf(sealedUnderNew)).not.toBe(keyIdOf(sealedUnderOld));

    const onlyNew = await app({ encryption: { keys: [newKeyHex] } });
    expect((await post(onlyNew.http, '/charges', fresh, { amount: 2 })).status).toBe(201);
    const mark = log.lines.length;
    expectProblem(
      await post(onlyNew.http, '/charges', key, { amount: 1 }),
      500,
      'response-unreadable',
    );
    // Failed closed: the handler did not run again, the record is still there, and the log line
    // names the key but holds nothing of the body.
    expect(
      before.calls.count('charges', key) +
        rotated.calls.count('charges', key) +
        onlyNew.calls.count('charges', key),
    ).toBe(1);
    expect((await recordsOf(dataSource, key))[0].responseBody).toBe(sealedUnderOld);
    const lines = log.lines
      .slice(mark)
      .map((line) => line.text)
      .join('\n');
    expect(lines).toContain('not configured');
    expect(lines).not.toContain(first.body.id);
    expect(onlyNew.app.get(IdempotencyMetrics).snapshot().unreadable).toBe(1);
  });

  it('refuses a tampered ciphertext, and a status changed beside it', async () => {
    const fixture = await app({ encryption: { keys: [oldKey] } });
    const flipped = newKey();
    await post(fixture.http, '/charges', flipped, { amount: 3 }).expect(201);
    const [record] = await recordsOf(dataSource, flipped);
    const parts = record.responseBody!.split('.');
    parts[3] = flipFirstCharacter(parts[3]);
    await update(dataSource, flipped, { responseBody: parts.join('.') });
    expectProblem(
      await post(fixture.http, '/charges', flipped, { amount: 3 }),
      500,
      'response-unreadable',
    );

    const restatused = newKey();
    await post(fixture.http, '/charges', restatused, { amount: 4 }).expect(201);
    await update(dataSource, restatused, { responseStatus: 200 });
    expectProblem(
      await post(fixture.http, '/charges', restatused, { amount: 4 }),
      500,
      'response-unreadable',
    );
    expect(fixture.calls.count('charges', flipped)).toBe(1);
    expect(fixture.calls.count('charges', restatused)).toBe(1);
  });

  it('refuses a sealed response copied under another key; the original still replays', async () => {
    const fixture = await app({ encryption: { keys: [oldKey] } });
    const victim = newKey();
    const source = newKey();
    await post(fixture.http, '/charges', victim, { amount: 5 }).expect(201);
    const original = await post(fixture.http, '/charges', source, { amount: 5 }).expect(201);
    const [copied] = await recordsOf(dataSource, source);
    // Same payload, so the fingerprint matches: only the authenticated identity tells them apart.
    await update(dataSource, victim, { responseBody: copied.responseBody });
    expectProblem(
      await post(fixture.http, '/charges', victim, { amount: 5 }),
      500,
      'response-unreadable',
    );
    const replay = await post(fixture.http, '/charges', source, { amount: 5 }).expect(201);
    expect(replay.body).toEqual(original.body);
  });

  it('rows stored before encryption: refused by default, replayed with acceptUnsealed, and new ones sealed', async () => {
    const clear = await app({});
    const key = newKey();
    const first = await post(clear.http, '/charges', key, { amount: 6 }).expect(201);
    expect((await recordsOf(dataSource, key))[0].responseBodyEncoding).toBe('json');

    const strict = await app({ encryption: { keys: [oldKey] } });
    expectProblem(
      await post(strict.http, '/charges', key, { amount: 6 }),
      500,
      'response-unreadable',
    );

    const migrating = await app({ encryption: { keys: [oldKey], acceptUnsealed: true } });
    const replay = await post(migrating.http, '/charges', key, { amount: 6 }).expect(201);
    expect(replay.body).toEqual(first.body);
    const fresh = newKey();
    await post(migrating.http, '/charges', fresh, { amount: 7 }).expect(201);
    expect((await recordsOf(dataSource, fresh))[0].responseBodyEncoding).toBe(SEALED_ENCODING);
    expect(
      clear.calls.count('charges', key) +
        strict.calls.count('charges', key) +
        migrating.calls.count('charges', key),
    ).toBe(1);
  });

  it('envelopes of the earlier version (v1): refused by default, replayed with acceptV1Envelopes', async () => {
    const sealing = await app({ encryption: { keys: [oldKey] } });
    const key = newKey();
    await post(sealing.http, '/charges', key, { amount: 9 }).expect(201);
    // The row as the earlier version stored it: an envelope bound to the id and status only.
    const [record] = await recordsOf(dataSource, key);
    const earlier = { id: 'sealed-by-v1', amount: 9 };
    const envelope = sealV1(oldKey, record, {
      h: { 'content-type': 'application/json; charset=utf-8' },
      b: JSON.stringify(earlier),
      e: 'json',
    });
    await update(dataSource, key, { responseBody: envelope });

    const mark = log.lines.length;
    expectProblem(
      await post(sealing.http, '/charges', key, { amount: 9 }),
      500,
      'response-unreadable',
    );
    const lines = log.lines.slice(mark).map((line) => line.text);
    expect(lines.join('\n')).toContain('acceptV1Envelopes');

    const migrating = await app({ encryption: { keys: [oldKey], acceptV1Envelopes: true } });
    const replay = await post(migrating.http, '/charges', key, { amount: 9 }).expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(earlier);
    expect(sealing.calls.count('charges', key) + migrating.calls.count('charges', key)).toBe(1);
  });

  it('a sealed row read with encryption turned off fails closed', async () => {
    const sealing = await app({ encryption: { keys: [oldKey] } });
    const key = newKey();
    await post(sealing.http, '/charges', key, { amount: 8 }).expect(201);
    const clear = await app({});
    expectProblem(
      await post(clear.http, '/charges', key, { amount: 8 }),
      500,
      'response-unreadable',
    );
    expect(sealing.calls.count('charges', key) + clear.calls.count('charges', key)).toBe(1);
  });
});

/** The stored fields of a record that someone with write access to the store could change. */
interface StoredFields {
  readonly fingerprint: string;
  readonly body: string | null;
  readonly expiresAt: number;
}

/** A store the tests can boot apps on and whose records they can read and change directly. */
interface TamperableStore {
  app(options: Partial<IdempotencyModuleOptions>): Promise<FixtureApp>;
  read(key: string): Promise<StoredFields>;
  write(key: string, fields: Partial<StoredFields>): Promise<void>;
  close(): Promise<void>;
}

/** A TypeORM store on `database`: one DataSource shared by its apps, the table changed with SQL. */
async function databaseStore(database: TestDatabase): Promise<TamperableStore> {
  const dataSource = await openShared(database);
  const apps: FixtureApp[] = [];
  return {
    async app(options) {
      const fixture = await createFixtureApp(database, options, 'express', { dataSource });
      apps.push(fixture);
      return fixture;
    },
    async read(key) {
      const [record] = await recordsOf(dataSource, key);
      return {
        fingerprint: record.fingerprint,
        body: record.responseBody,
        expiresAt: record.expiresAt,
      };
    },
    async write(key, { fingerprint, body, expiresAt }) {
      await update(dataSource, key, {
        ...(fingerprint === undefined ? {} : { fingerprint }),
        ...(body === undefined ? {} : { responseBody: body }),
        ...(expiresAt === undefined ? {} : { expiresAt }),
      });
    },
    async close() {
      for (const fixture of apps) await fixture.close();
      await dataSource.destroy();
    },
  };
}

/** The Redis store: its record hashes changed with HSET (fields f, b and x). */
async function redisStore(url: string): Promise<TamperableStore> {
  const prefix = `encryption-${randomUUID()}:`;
  const redis = new Redis(url);
  const [, pglite] = eachDatabase[0];
  const unused = await openShared(pglite);
  const apps: FixtureApp[] = [];
  const recordKey = async (key: string) => {
    const keys = await redis.keys(`${prefix}*`);
    const found = keys.find((candidate) => candidate.endsWith(`,${JSON.stringify(key)}]`));
    if (!found) throw new Error(`no record of ${key}`);
    return found;
  };
  return {
    async app(options) {
      const store = new RedisIdempotencyStore(redis, { prefix });
      const fixture = await createFixtureApp(pglite, { store, ...options }, 'express', {
        dataSource: unused,
      });
      apps.push(fixture);
      return fixture;
    },
    async read(key) {
      const hash = await redis.hgetall(await recordKey(key));
      return { fingerprint: hash.f, body: hash.b ?? null, expiresAt: Number(hash.x) };
    },
    async write(key, { fingerprint, body, expiresAt }) {
      const fields: string[] = [];
      if (fingerprint !== undefined) fields.push('f', fingerprint);
      if (body !== undefined && body !== null) fields.push('b', body);
      if (expiresAt !== undefined) fields.push('x', String(expiresAt));
      await redis.hset(await recordKey(key), ...fields);
    },
    async close() {
      for (const fixture of apps) await fixture.close();
      await unused.destroy();
      await redis.quit();
    },
  };
}

const eachStore: (readonly [string, () => Promise<TamperableStore>])[] = [
  ...eachDatabase.map(([name, database]) => [name, () => databaseStore(database)] as const),
  ...(process.env.REDIS_URL ? [['redis', () => redisStore(process.env.REDIS_URL!)] as const] : []),
];

/**
 * Someone with write access to the store (the threat encryption at rest is for) changes what the
 * sealed response is bound to: the payload's fingerprint, or the lifetime of the key.
 */
describe.each(eachStore)('encrypted records tampered with in %s', (_name, open) => {
  let store: TamperableStore;
  let fixture: FixtureApp;
  beforeAll(async () => {
    store = await open();
    // No replay cache: every retry reads the store.
    fixture = await store.app({ encryption: { keys: [oldKey] }, replayCache: false });
  });
  afterAll(() => store?.close());

  it("refuses a response whose fingerprint was changed to another payload's", async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 11 }).expect(201);
    const other = newKey();
    await post(fixture.http, '/charges', other, { amount: 12 }).expect(201);
    await store.write(key, { fingerprint: (await store.read(other)).fingerprint });

    // The retry with the other payload must not be served the first payload's response.
    const retry = await post(fixture.http, '/charges', key, { amount: 12 });
    expectProblem(retry, 500, 'response-unreadable');
    expect(fixture.calls.count('charges', key)).toBe(1);
  });

  it.each([
    ['the same payload', 21],
    ['another payload', 22],
  ])(
    'refuses a response copied from an earlier lifetime of the key, completed with %s',
    async (_case, amount) => {
      const key = newKey();
      const earlier = await post(fixture.http, '/charges', key, { amount: 21 }).expect(201);
      const sealedEarlier = (await store.read(key)).body;
      // Its TTL ends; the key is claimed and completed again.
      await store.write(key, { expiresAt: Date.now() - 1 });
      const current = await post(fixture.http, '/charges', key, { amount }).expect(201);
      expect(current.headers['idempotent-replayed']).toBeUndefined();
      expect(current.body.id).not.toBe(earlier.body.id);

      await store.write(key, { body: sealedEarlier });
      expectProblem(
        await post(fixture.http, '/charges', key, { amount }),
        500,
        'response-unreadable',
      );
      expect(fixture.calls.count('charges', key)).toBe(2);
    },
  );
});

describe('encryption options', () => {
  it.each([
    ['no keys', { keys: [] }],
    ['a short key', { keys: [randomBytes(16).toString('base64')] }],
    ['a passphrase', { keys: ['correct horse battery staple'] }],
  ])('refuse %s at startup', async (_case, encryption) => {
    const [, database] = eachDatabase[0];
    await expect(
      createFixtureApp(database, { encryption } as Partial<IdempotencyModuleOptions>),
    ).rejects.toThrow(/encryption\.keys/);
  });
});

async function openShared(database: TestDatabase): Promise<DataSource> {
  const dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
  await dataSource.initialize();
  return dataSource;
}

function update(dataSource: DataSource, key: string, values: Partial<IdempotencyRecord>) {
  return dataSource.getRepository(IdempotencyRecord).update({ key }, values);
}

/** A response sealed as the earlier version (envelope v1) sealed it. */
function sealV1(
  base64Key: string,
  record: IdempotencyRecord,
  plaintext: { h: Record<string, string>; b: string; e: string },
): string {
  const secret = Buffer.from(base64Key, 'base64');
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', secret, iv);
  cipher.setAAD(
    Buffer.from(
      JSON.stringify([
        'nestjs-idempotency/v1',
        record.scope,
        record.endpoint,
        record.key,
        record.responseStatus,
        record.responseIsError,
      ]),
    ),
  );
  const ciphertext = Buffer.concat([cipher.update(JSON.stringify(plaintext)), cipher.final()]);
  return [
    'v1',
    createHash('sha256').update(secret).digest('hex').slice(0, 16),
    iv.toString('base64url'),
    ciphertext.toString('base64url'),
    cipher.getAuthTag().toString('base64url'),
  ].join('.');
}

function keyIdOf(envelope: string): string {
  return envelope.split('.')[1];
}

function flipFirstCharacter(part: string): string {
  return (part[0] === 'A' ? 'B' : 'A') + part.slice(1);
}
