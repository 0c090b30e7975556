import {
  createFixtureApp,
  recordsOf,
  waitUntilPast,
  type FixtureApp,
} from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

describe.each(eachTarget)('duplicates in flight on %s', (_name, { database, platform }) => {
  let fixture: FixtureApp;
  beforeAll(
    async () => (fixture = await createFixtureApp(database, { waitPollInterval: 10 }, platform)),
  );
  afterAll(() => fixture.close());

  it('answers 409 with Retry-After while the first request runs, then replays its result', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/slow', key).then((response) => response);
    await fixture.gate.arrived(key);

    const duplicate = await post(fixture.http, '/slow', key);
    expectProblem(duplicate, 409, 'request-in-progress');
    // Try again in a second, not when the claim's one-minute lock would run out.
    expect(duplicate.headers['retry-after']).toBe('1');

    fixture.gate.open(key);
    const original = await first;
    expect(original.status).toBe(201);
    const retry = await post(fixture.http, '/slow', key);
    expect(retry.body).toEqual(original.body);
    expect(fixture.calls.count('slow', key)).toBe(1);
  });

  it('answers 422, not 409, for another payload while the first request runs', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/slow', key, { n: 1 }).then((response) => response);
    await fixture.gate.arrived(key);
    expectProblem(await post(fixture.http, '/slow', key, { n: 2 }), 422, 'key-reused');
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
  });

  it('runs the handler exactly once for 50 parallel requests with one key (reject mode)', async () => {
    const key = newKey();
    const responses = await Promise.all(
      Array.from({ length: 50 }, () => post(fixture.http, '/charges', key, { amount: 50 })),
    );
    expect(fixture.calls.count('charges', key)).toBe(1);
    const originals = responses.filter(
      (r) => r.status === 201 && r.headers['idempotent-replayed'] === undefined,
    );
    expect(originals).toHaveLength(1);
    for (const response of responses) {
      if (response.status === 201) expect(response.body).toEqual(originals[0].body);
      else expect(response.status).toBe(409);
    }
  });

  it('answers 409 to all 49 duplicates while the first of 50 is held', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/slow', key).then((response) => response);
    await fixture.gate.arrived(key);
    const duplicates = await Promise.all(
      Array.from({ length: 49 }, () => post(fixture.http, '/slow', key)),
    );
    expect(duplicates.map((r) => r.status)).toEqual(Array(49).fill(409));
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
    expect(fixture.calls.count('slow', key)).toBe(1);
  });

  it('in wait mode, 50 parallel duplicates all get the same body and the handler runs once', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const all = Array.from({ length: 50 }, () =>
      post(fixture.http, '/slow-wait', key).then((response) => response),
    );
    await fixture.gate.arrived(key);
    fixture.gate.open(key);
    const responses = await Promise.all(all);
    expect(new Set(responses.map((r) => r.status))).toEqual(new Set([201]));
    expect(new Set(responses.map((r) => r.body.id)).size).toBe(1);
    expect(responses.filter((r) => r.headers['idempotent-replayed'] === 'true')).toHaveLength(49);
    expect(fixture.calls.count('slow-wait', key)).toBe(1);
  });

  it('in wait mode, answers 409 when the wait runs out', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/short-wait', key).then((response) => response);
    await fixture.gate.arrived(key);
    expectProblem(await post(fixture.http, '/short-wait', key), 409, 'request-in-progress');
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
  });

  it('lets a retry take over a record stuck past lockTimeout; the stale owner cannot overwrite it', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const stuck = post(fixture.http, '/short-lock', key).then((response) => response);
    await fixture.gate.arrived(key);
    expectProblem(await post(fixture.http, '/short-lock', key), 409, 'request-in-progress');

    const [locked] = await recordsOf(fixture.dataSource, key);
    await waitUntilPast(locked.expiresAt);
    const takeover = await post(fixture.http, '/short-lock', key);
    expect(takeover.status).toBe(201);
    expect(takeover.headers['idempotent-replayed']).toBeUndefined();
    expect(fixture.calls.count('short-lock', key)).toBe(2);

    // The stuck handler finishes late: its client gets its response, the record keeps the new one.
    fixture.gate.open(key);
    expect((await stuck).status).toBe(201);
    const replay = await post(fixture.http, '/short-lock', key);
    expect(replay.body).toEqual(takeover.body);
    const [record] = await recordsOf(fixture.dataSource, key);
    expect(JSON.parse(record.responseBody!)).toEqual(takeover.body);
  });
});
