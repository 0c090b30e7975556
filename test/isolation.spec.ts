import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { newKey, post } from './support/http.js';

describe.each(eachTarget)('caller scopes on %s', (_name, { database, platform }) => {
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(database, {}, platform)));
  afterAll(() => fixture.close());

  it('gives two callers with the same key their own execution and their own response', async () => {
    const key = newKey();
    const alice = await post(fixture.http, '/scoped', key).set('X-Api-Key', 'alice').expect(201);
    const bob = await post(fixture.http, '/scoped', key).set('X-Api-Key', 'bob').expect(201);
    expect(alice.body.owner).toBe('alice');
    expect(bob.body.owner).toBe('bob');
    expect(bob.headers['idempotent-replayed']).toBeUndefined();

    const bobRetry = await post(fixture.http, '/scoped', key).set('X-Api-Key', 'bob');
    expect(bobRetry.body).toEqual(bob.body);
    expect(bobRetry.body.owner).toBe('bob');
    expect(fixture.calls.count('scoped:alice', key)).toBe(1);
    expect(fixture.calls.count('scoped:bob', key)).toBe(1);

    const records = await recordsOf(fixture.dataSource, key);
    expect(records.map((r) => r.scope).sort()).toEqual(['alice', 'bob']);
  });

  it('a scope-less route shares keys between callers (scope defaults to one scope)', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key).set('X-Api-Key', 'alice').expect(201);
    const other = await post(fixture.http, '/charges', key).set('X-Api-Key', 'bob');
    expect(other.headers['idempotent-replayed']).toBe('true');
  });
});

describe.each(eachTarget)('a module-wide scope resolver on %s', (_name, { database, platform }) => {
  it('scopes every route by it', async () => {
    const fixture = await createFixtureApp(
      database,
      {
        scope: (request) => String(request.headers['x-tenant'] ?? 'anonymous'),
      },
      platform,
    );
    try {
      const key = newKey();
      await post(fixture.http, '/charges', key).set('X-Tenant', 't1').expect(201);
      const t2 = await post(fixture.http, '/charges', key).set('X-Tenant', 't2').expect(201);
      expect(t2.headers['idempotent-replayed']).toBeUndefined();
      expect(fixture.calls.count('charges', key)).toBe(2);
      expect((await recordsOf(fixture.dataSource, key)).map((r) => r.scope).sort()).toEqual([
        't1',
        't2',
      ]);
    } finally {
      await fixture.close();
    }
  });
});
