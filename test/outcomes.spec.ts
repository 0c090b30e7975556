import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { newKey, post } from './support/http.js';

describe.each(eachTarget)('which outcomes are stored, on %s', (_name, { database, platform }) => {
  let fixture: FixtureApp;
  beforeAll(
    async () =>
      (fixture = await createFixtureApp(database, { maxResponseBytes: 10_000 }, platform)),
  );
  afterAll(() => fixture.close());

  it('releases the key after a thrown error (500), so a retry runs the handler again', async () => {
    const key = newKey();
    await post(fixture.http, '/flaky', key, { fail: 'crash' }).expect(500);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    await post(fixture.http, '/flaky', key, { fail: 'crash' }).expect(500);
    expect(fixture.calls.count('flaky', key)).toBe(2);
  });

  it('releases the key after a 5xx HttpException', async () => {
    const key = newKey();
    // The fingerprint binds a key to its payload: the retry must send the same body.
    await post(fixture.http, '/flaky', key, { fail: '503' }).expect(503);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    expect(fixture.calls.count('flaky', key)).toBe(1);
  });

  it('stores and replays a business 4xx (402) without running the handler again', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/declined', key).expect(402);
    const retry = await post(fixture.http, '/declined', key).expect(402);
    expect(retry.body).toEqual(first.body);
    expect(retry.body.code).toBe('card_declined');
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(fixture.calls.count('declined', key)).toBe(1);
  });

  it('releases a 400 from validation: the uncorrected retry fails again, the corrected one runs', async () => {
    const key = newKey();
    await post(fixture.http, '/validated', key, { amount: 'ten' }).expect(400);
    await post(fixture.http, '/validated', key, { amount: 'ten' }).expect(400);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    const corrected = await post(fixture.http, '/validated', key, { amount: 10 }).expect(201);
    expect(corrected.body.amount).toBe(10);
    const retry = await post(fixture.http, '/validated', key, { amount: 10 }).expect(201);
    expect(retry.body).toEqual(corrected.body);
    expect(fixture.calls.count('validated', key)).toBe(3);
  });

  it('follows a per-route storeStatuses policy (here: a 404 is released)', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/store-2xx-only', key).expect(404);
    const second = await post(fixture.http, '/store-2xx-only', key).expect(404);
    expect(second.body).not.toEqual(first.body);
    expect(fixture.calls.count('store-2xx-only', key)).toBe(2);
  });

  it('sends a response over maxResponseBytes but does not store it, releasing the key', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/big', key, { bytes: 20_000 }).expect(201);
    expect(first.body.padding).toHaveLength(20_000);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
    const retry = await post(fixture.http, '/big', key, { bytes: 20_000 }).expect(201);
    expect(retry.body.id).not.toBe(first.body.id);
    expect(fixture.calls.count('big', key)).toBe(2);
  });

  it('never stores its own 400/409/422 answers', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    await post(fixture.http, '/charges', key, { amount: 2 }).expect(422);
    const records = await recordsOf(fixture.dataSource, key);
    expect(records).toHaveLength(1);
    expect(records[0].responseStatus).toBe(201);
  });
});
