import request from 'supertest';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

describe.each(eachTarget)('first request and replay on %s', (_name, { database, platform }) => {
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(database, {}, platform)));
  afterAll(() => fixture.close());

  it('runs the handler once and replays status, headers and body with Idempotent-Replayed', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/charges', key, { amount: 100 });
    expect(first.status).toBe(201);
    expect(first.headers['idempotent-replayed']).toBeUndefined();

    const retry = await post(fixture.http, '/charges', key, { amount: 100 });
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    expect(retry.headers['x-handler']).toBe('charges');
    expect(retry.headers.location).toBe('/charges/latest');
    expect(retry.headers['content-type']).toBe(first.headers['content-type']);
    expect(fixture.calls.count('charges', key)).toBe(1);
  });

  it('stores the record completed, with the response, under the key', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 5 }).expect(201);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(record).toMatchObject({
      endpoint: 'POST /charges',
      scope: '',
      state: 'completed',
      responseStatus: 201,
    });
    expect(JSON.parse(record.responseBody!)).toMatchObject({ amount: 5 });
  });

  it('treats a body with the same fields in another order as the same request', async () => {
    const key = newKey();
    const first = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', key)
      .set('Content-Type', 'application/json')
      .send('{"amount":7,"meta":{"a":1,"b":2}}');
    const retry = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', key)
      .set('Content-Type', 'application/json')
      .send('{"meta":{"b":2,"a":1},"amount":7}');
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
  });

  it('answers 422 for the same key with another body, and still replays the original', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/charges', key, { amount: 100 });
    const reused = await post(fixture.http, '/charges', key, { amount: 999 });
    expectProblem(reused, 422, 'key-reused');
    const retry = await post(fixture.http, '/charges', key, { amount: 100 });
    expect(retry.body).toEqual(first.body);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(fixture.calls.count('charges', key)).toBe(1);
  });

  it('answers 422 for the same key on the same route pattern with other path parameters', async () => {
    const key = newKey();
    await post(fixture.http, '/accounts/acc_1/charges', key).expect(201);
    expectProblem(await post(fixture.http, '/accounts/acc_2/charges', key), 422, 'key-reused');
    expect(fixture.calls.count('account-charges', key)).toBe(1);
  });

  it('keeps one key on two routes as two independent operations', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    const other = await post(fixture.http, '/replay-200', key, { amount: 1 });
    expect(other.status).toBe(201);
    expect(other.headers['idempotent-replayed']).toBeUndefined();
    expect((await recordsOf(fixture.dataSource, key)).map((r) => r.endpoint).sort()).toEqual([
      'POST /charges',
      'POST /replay-200',
    ]);
  });

  it('treats keys as case-sensitive', async () => {
    const key = `Key-${newKey()}`;
    await post(fixture.http, '/charges', key).expect(201);
    const other = await post(fixture.http, '/charges', key.toLowerCase());
    expect(other.headers['idempotent-replayed']).toBeUndefined();
    expect(fixture.calls.count('charges', key.toLowerCase())).toBe(1);
  });

  it('replays with 200 when the route sets replayStatus: 200', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/replay-200', key);
    expect(first.status).toBe(201);
    const retry = await post(fixture.http, '/replay-200', key);
    expect(retry.status).toBe(200);
    expect(retry.body).toEqual(first.body);
  });

  it("replays a route's own @HttpCode", async () => {
    const key = newKey();
    const first = await post(fixture.http, '/accepted', key).expect(202);
    const retry = await post(fixture.http, '/accepted', key).expect(202);
    expect(retry.body).toEqual(first.body);
  });

  it('replays a text body with its Content-Type', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/text', key).expect(201);
    const retry = await post(fixture.http, '/text', key).expect(201);
    expect(retry.text).toBe(first.text);
    expect(retry.text).toMatch(/^receipt /);
    expect(retry.headers['content-type']).toBe('text/plain; charset=utf-8');
  });

  it("replays the handler's own headers but never Set-Cookie", async () => {
    const key = newKey();
    const first = await post(fixture.http, '/cookie', key).expect(201);
    expect(first.headers['set-cookie']).toEqual(['session=first-caller']);
    const retry = await post(fixture.http, '/cookie', key).expect(201);
    expect(retry.headers['x-request-cost']).toBe('42');
    expect(retry.headers['set-cookie']).toBeUndefined();
    expect(retry.headers['idempotent-replayed']).toBe('true');
  });

  it('leaves a route without @Idempotent() alone', async () => {
    const key = newKey();
    await post(fixture.http, '/plain', key).expect(201);
    const again = await post(fixture.http, '/plain', key).expect(201);
    expect(again.headers['idempotent-replayed']).toBeUndefined();
    expect(fixture.calls.count('plain', key)).toBe(2);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
  });
});
