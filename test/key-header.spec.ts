import request from 'supertest';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

describe.each(eachTarget)('the Idempotency-Key header on %s', (_name, { database, platform }) => {
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(database, {}, platform)));
  afterAll(() => fixture.close());

  it('answers 400 problem+json when a required key is missing, without running the handler', async () => {
    expectProblem(await post(fixture.http, '/charges', undefined), 400, 'key-missing');
    expect(fixture.calls.count('charges', undefined)).toBe(0);
  });

  it.each([
    ['empty', ''],
    ['longer than 255 characters', 'k'.repeat(256)],
    ['a malformed quoted string', '"abc'],
    ['a quoted string with text after it', '"abc"x'],
  ])('answers 400 for a key that is %s', async (_case, value) => {
    const response = await post(fixture.http, '/charges', value);
    expectProblem(response, 400, 'key-invalid');
  });

  it('answers 400 for a key with characters outside printable ASCII', async () => {
    // Node refuses to send control characters, so this one goes out as raw latin-1 bytes.
    const response = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', Buffer.from('clé', 'latin1').toString('latin1'))
      .send({});
    expectProblem(response, 400, 'key-invalid');
  });

  it('answers 400 when the header is sent twice', async () => {
    const key = newKey();
    const response = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', [key, key] as any) // an array goes out as two field lines
      .send({});
    expectProblem(response, 400, 'key-invalid');
    expect(response.body.detail).toMatch(/once/);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
  });

  it('treats a quoted structured-field string as the same key as the bare token', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/charges', key, { amount: 3 }).expect(201);
    const quoted = await post(fixture.http, '/charges', `"${key}"`, { amount: 3 }).expect(201);
    expect(quoted.headers['idempotent-replayed']).toBe('true');
    expect(quoted.body).toEqual(first.body);
  });

  it('reads the header name case-insensitively', async () => {
    const key = newKey();
    await request(fixture.http).post('/charges').set('IDEMPOTENCY-KEY', key).send({}).expect(201);
    const retry = await request(fixture.http).post('/charges').set('idempotency-key', key).send({});
    expect(retry.headers['idempotent-replayed']).toBe('true');
  });

  it('runs a route with required: false without a key, every time', async () => {
    await post(fixture.http, '/optional', undefined).expect(201);
    await post(fixture.http, '/optional', undefined).expect(201);
    expect(fixture.calls.count('optional', undefined)).toBe(2);
  });

  it('still protects a required: false route when a key is sent', async () => {
    const key = newKey();
    await post(fixture.http, '/optional', key).expect(201);
    const retry = await post(fixture.http, '/optional', key).expect(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(fixture.calls.count('optional', key)).toBe(1);
  });
});
