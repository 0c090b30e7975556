import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  IdempotencyMetrics,
  IdempotencyRecord,
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

function keyIdOf(envelope: string): string {
  return envelope.split('.')[1];
}

function flipFirstCharacter(part: string): string {
  return (part[0] === 'A' ? 'B' : 'A') + part.slice(1);
}
