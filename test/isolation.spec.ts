import { UnauthorizedException } from '@nestjs/common';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachTarget } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

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

/** What the module-wide resolver below returns for each `X-Scope` header. */
const RESOLVED: Record<string, () => unknown> = {
  number: () => 42,
  string: () => '42',
  bigint: () => 42n,
  uuid: () => '0b4c5a8e-9f6e-4f7e-8d4c-3a2b1c0d9e8f',
  undefined: () => undefined,
  null: () => null,
  object: () => ({ id: 42 }),
  array: () => ['a', 'b'],
  nan: () => Number.NaN,
  boolean: () => true,
  unauthorized: () => {
    throw new UnauthorizedException('no session');
  },
};

describe.each(eachTarget)(
  'what a scope resolver returns, on %s',
  (_name, { database, platform }) => {
    let fixture: FixtureApp;
    beforeAll(
      async () =>
        (fixture = await createFixtureApp(
          database,
          // Typed as an app would: a numeric id type-checks.
          {
            scope: (request: { headers: Record<string, string> }) =>
              RESOLVED[request.headers['x-scope']]() as number,
          },
          platform,
        )),
    );
    afterAll(() => fixture.close());

    const charge = (key: string, scope: string) =>
      post(fixture.http, '/charges', key, { amount: 1 }).set('X-Scope', scope);

    it.each([
      ['number', '42'],
      ['bigint', '42'],
      ['uuid', '0b4c5a8e-9f6e-4f7e-8d4c-3a2b1c0d9e8f'],
      ['undefined', ''],
      ['null', ''],
    ])('stores what the resolver returns (%s) as the scope %j', async (kind, scope) => {
      const key = newKey();
      await charge(key, kind).expect(201);
      expect((await recordsOf(fixture.dataSource, key)).map((r) => r.scope)).toEqual([scope]);
    });

    it('treats 42, 42n and "42" as one caller', async () => {
      const key = newKey();
      const first = await charge(key, 'number').expect(201);
      for (const kind of ['string', 'bigint']) {
        const retry = await charge(key, kind).expect(201);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(retry.body).toEqual(first.body);
      }
      expect(fixture.calls.count('charges', key)).toBe(1);
    });

    it.each(['object', 'array', 'nan', 'boolean'])(
      'refuses a scope that is no identity (%s) with a problem naming `scope`, without running the handler',
      async (kind) => {
        const key = newKey();
        const refused = await charge(key, kind);
        expectProblem(refused, 500, 'scope-invalid');
        expect(refused.body.detail).toMatch(/scope/);
        expect(fixture.calls.count('charges', key)).toBe(0);
        expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
      },
    );

    it("answers a resolver's HttpException (UnauthorizedException) as it is", async () => {
      const key = newKey();
      const refused = await charge(key, 'unauthorized').expect(401);
      expect(refused.body).toMatchObject({ statusCode: 401, message: 'no session' });
      expect(fixture.calls.count('charges', key)).toBe(0);
    });
  },
);
