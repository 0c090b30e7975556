import { ApolloDriver, type ApolloDriverConfig } from '@nestjs/apollo';
import { Catch, HttpException, HttpStatus, UseFilters } from '@nestjs/common';
import {
  Args,
  GqlExceptionFilter,
  GraphQLISODateTime,
  GraphQLModule,
  Mutation,
  Query,
  Resolver,
} from '@nestjs/graphql';
import { GraphQLError } from 'graphql';
import { createHash, randomUUID } from 'node:crypto';
import { Idempotent } from '../lib/index.js';
import { CallLog } from './fixtures/handler-probes.js';
import {
  AccountMutationsResolver,
  AccountsResolver,
  EmailScalar,
  LedgerResolver,
  SHORT_LOCK_MS,
} from './fixtures/graphql-review.resolver.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { testDatabases } from './support/databases.js';
import { CapturedLog } from './support/captured-log.js';
import { apolloModule, codeOf, postGraphQL, type GraphQLAnswer } from './support/graphql.js';
import { HttpClient, jsonOf } from './support/http-client.js';

const pglite = testDatabases.find((database) => database.name === 'pglite')!;

const ACCOUNT = `id closedAt balance priority colour tier email meta reminders
  holder { __typename name since ... on Human { born_on accounts { id opened_at } } ... on Robot { model } }
  branch { __typename label ... on Branch { openedAt } }`;
describe.each(['express', 'fastify'] as const)('GraphQL as apps write it, on %s', (platform) => {
  let fixture: ReliabilityApp;
  let client: HttpClient;
  const log = new CapturedLog();

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      pglite,
      {},
      {
        platform,
        logger: log,
        imports: () => [apolloModule(platform, { autoSchemaFile: true })],
        providers: [AccountsResolver, EmailScalar, LedgerResolver],
      },
    );
    client = new HttpClient(fixture.baseUrl, 4);
  });
  afterAll(async () => {
    client.close();
    await fixture.close();
  });

  const graphql = (
    query: string,
    variables: Record<string, unknown> = {},
    headers: Record<string, string> = {},
  ) => postGraphQL<GraphQLAnswer>(client, { query, variables }, headers);

  /** Sends `query` twice with a fresh key: both answers, and how often `field` ran. */
  async function twice(field: string, selection = '') {
    const key = randomUUID();
    const query = `mutation M($key: String) { ${field}(idempotencyKey: $key) ${selection} }`;
    const first = await graphql(query, { key });
    const again = await graphql(query, { key });
    return { key, first, again, runs: fixture.calls.count(field, key) };
  }

  it('replays Timestamps, a class-based scalar, a JSON scalar, numeric, string and object enums, interfaces resolved by class and by name byte for byte', async () => {
    const { first, again, runs } = await twice('openAccount', `{ ${ACCOUNT} }`);
    expect(first.body.errors).toBeUndefined();
    expect(first.body.data?.openAccount).toMatchObject({
      closedAt: expect.any(Number),
      priority: 'High',
      colour: 'Green',
      tier: 'PRO',
      email: expect.stringMatching(/@example\.com$/),
      meta: { at: expect.stringMatching(/^\d{4}-/), nested: { n: 1 } },
      reminders: [expect.any(String), null],
      holder: { __typename: 'Robot', model: 2 },
      branch: { __typename: 'Branch', label: 'main' },
    });
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('replays a renamed field (@Field({ name })) holding a Date, and a field resolver reading it', async () => {
    const { first, again, runs } = await twice('openAccount', '{ id opened_at summary }');
    expect(first.body.errors).toBeUndefined();
    expect(first.body.data?.openAccount.opened_at).toMatch(/^\d{4}-/);
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('replays a lazy relation: a field whose value is a promise', async () => {
    const { first, again, runs } = await twice('openAccount', '{ id tags { name taggedAt } }');
    expect(first.body.errors).toBeUndefined();
    expect(first.body.data?.openAccount.tags).toEqual([
      { name: 'a', taggedAt: expect.stringMatching(/^\d{4}-/) },
      { name: 'b', taggedAt: expect.stringMatching(/^\d{4}-/) },
    ]);
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('replays a document whose toJSON leaves out what graphql reads (a Mongoose virtual id)', async () => {
    const { first, again, runs } = await twice('registerCustomer', '{ id name joinedAt }');
    expect(first.body.errors).toBeUndefined();
    expect(first.body.data?.registerCustomer).toEqual({
      id: expect.any(String),
      name: 'Ada',
      joinedAt: expect.stringMatching(/^\d{4}-/),
    });
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('replays a resolver that returned an Observable', async () => {
    const { first, again, runs } = await twice('openAccountObservable', `{ ${ACCOUNT} }`);
    expect(first.body.errors).toBeUndefined();
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('keeps its claim while a lazy relation loads, longer than its lock timeout: retries are refused, it runs once', async () => {
    const key = randomUUID();
    const query =
      'mutation L($key: String) { openSlowAccount(idempotencyKey: $key) { id tags { name } } }';
    fixture.gate.hold(key);
    const first = graphql(query, { key });
    await fixture.gate.arrived(key);
    const codes: unknown[] = [];
    for (const until = Date.now() + 4 * SHORT_LOCK_MS; Date.now() < until;) {
      codes.push(codeOf((await graphql(query, { key })).body));
      await new Promise((resolve) => setTimeout(resolve, SHORT_LOCK_MS / 3));
    }
    fixture.gate.open(key);
    const answer = await first;
    expect(new Set(codes)).toEqual(new Set(['IDEMPOTENCY_REQUEST_IN_PROGRESS']));
    expect(answer.body.data?.openSlowAccount.tags).toEqual([{ name: 'slow' }]);
    expect((await graphql(query, { key })).text).toBe(answer.text);
    expect(fixture.calls.count('openSlowAccount', key)).toBe(1);
  });

  it('stores a result whose relations point back at their owner, and replays it: the mutation runs once', async () => {
    const { first, again, runs } = await twice('openHeldAccount', `{ ${ACCOUNT} }`);
    expect(first.body.errors).toBeUndefined();
    expect(first.body.data?.openHeldAccount.holder).toMatchObject({
      __typename: 'Human',
      born_on: '1815-12-10T00:00:00.000Z',
      accounts: [{ id: first.body.data?.openHeldAccount.id }],
    });
    expect(runs).toBe(1);
    expect(again.text).toBe(first.text);
  });

  it('replays a Promise of an entity, a list with nulls, a scalar and null', async () => {
    for (const [field, selection] of [
      ['openAccountLater', `{ ${ACCOUNT} tags { name } }`],
      ['openAccounts', `{ ${ACCOUNT} }`],
      ['countAccounts', ''],
      ['closeAccount', '{ id }'],
    ] as const) {
      const { first, again, runs } = await twice(field, selection);
      expect(first.body.errors).toBeUndefined();
      expect(again.text).toBe(first.text);
      expect(runs).toBe(1);
    }
  });

  it('keeps the stored result when a field resolver fails after the mutation resolved', async () => {
    const { first, again, runs } = await twice('openAccount', '{ id audit }');
    expect(first.body.data?.openAccount).toEqual({ id: expect.any(String), audit: null });
    expect(first.body.errors?.[0]?.path).toEqual(['openAccount', 'audit']);
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('fingerprints an input type with Dates, enums and a class-based scalar by its value', async () => {
    const key = randomUUID();
    const query = `mutation W($input: OpenAccountInput!, $key: String) {
      openWith(input: $input, idempotencyKey: $key) { id priority tier email }
    }`;
    const input = {
      openedAt: '2030-01-01T00:00:00.000Z',
      closedAt: 1893456000000,
      priority: 'High',
      tier: 'PRO',
      email: 'Ada@Example.com',
      notes: ['x', null],
    };
    const first = await graphql(query, { input, key });
    expect(first.body.errors).toBeUndefined();
    // The same values written otherwise: the same operation.
    const same = await graphql(query, {
      input: { ...input, openedAt: '2030-01-01T00:00:00Z', email: 'ada@example.com' },
      key,
    });
    expect(same.text).toBe(first.text);
    for (const other of [
      { priority: 'Low' },
      { tier: 'BASIC' },
      { openedAt: '2030-01-02T00:00:00.000Z' },
      { closedAt: 1893456000001 },
      { email: 'bob@example.com' },
      { notes: ['x'] },
    ]) {
      const answer = await graphql(query, { input: { ...input, ...other }, key });
      expect({ other, code: codeOf(answer.body) }).toEqual({
        other,
        code: 'IDEMPOTENCY_KEY_REUSED',
      });
    }
    // An input its scalar refuses never reaches the resolver: graphql's own BAD_USER_INPUT.
    const refused = await graphql(query, { input: { ...input, email: 'nobody' }, key });
    expect(codeOf(refused.body)).toBe('BAD_USER_INPUT');
    expect(refused.text).not.toMatch(/INTERNAL_SERVER_ERROR/);
    expect(fixture.calls.count('openWith', key)).toBe(1);
  });

  it('keeps two mutations under one header key apart: each runs once and replays its own answer', async () => {
    const key = randomUUID();
    const headers = { 'Idempotency-Key': key };
    const open = await graphql('mutation { openAccount { id } }', {}, headers);
    const reopen = await graphql('mutation { reopenAccount { id } }', {}, headers);
    expect(reopen.body.data?.reopenAccount.id).not.toBe(open.body.data?.openAccount.id);
    expect((await graphql('mutation { openAccount { id } }', {}, headers)).text).toBe(open.text);
    expect((await graphql('mutation { reopenAccount { id } }', {}, headers)).text).toBe(
      reopen.text,
    );
    expect(fixture.calls.count('openAccount', undefined)).toBe(1);
    expect(fixture.calls.count('reopenAccount', undefined)).toBe(1);
  });

  it('replays a business error carrying extensions.http (status, a header Map) with the status and body of the first answer', async () => {
    const key = randomUUID();
    const query =
      'mutation C($key: String) { chargeAccount(withHeader: true, idempotencyKey: $key) { id } }';
    const first = await client.send('/graphql', { body: { query, variables: { key } } });
    const again = await client.send('/graphql', { body: { query, variables: { key } } });
    expect(jsonOf(first).errors[0].extensions.code).toBe('CARD_DECLINED');
    expect({ status: again.status, text: again.text }).toEqual({
      status: first.status,
      text: first.text,
    });
    expect(fixture.calls.count('chargeAccount', key)).toBe(1);
  });

  it('leaves the queries of a resolver class marked @Idempotent() alone, and protects its mutations', async () => {
    const before = fixture.calls.count('ledgerSize', undefined);
    expect((await graphql('{ ledgerSize }')).body).toEqual({ data: { ledgerSize: 7 } });
    expect((await graphql('{ ledgerSize }')).body).toEqual({ data: { ledgerSize: 7 } });
    expect(fixture.calls.count('ledgerSize', undefined)).toBe(before + 2);
    const { first, again, runs } = await twice('postEntry');
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('answers refusals with HTTP 200 and a code, logging nothing at error level', async () => {
    const logged = log.lines.length;
    const tooLong = await graphql(
      'mutation M($key: String) { openAccount(idempotencyKey: $key) { id } }',
      { key: 'k'.repeat(300) },
    );
    expect(tooLong.status).toBe(200);
    expect(codeOf(tooLong.body)).toBe('IDEMPOTENCY_KEY_INVALID');
    const missing = await graphql('mutation { openAccount { id } }');
    expect(codeOf(missing.body)).toBe('IDEMPOTENCY_KEY_MISSING');
    const empty = await graphql(
      'mutation M($key: String) { openAccount(idempotencyKey: $key) { id } }',
      { key: '' },
    );
    expect(codeOf(empty.body)).toBe('IDEMPOTENCY_KEY_INVALID');
    // A JSON argument nested too deeply to fingerprint: refused, the resolver never ran.
    let deep: unknown = 'leaf';
    for (let level = 0; level < 1500; level++) deep = { deeper: deep };
    const deepKey = randomUUID();
    const unreadable = await graphql(
      'mutation A($note: JSON!, $key: String) { annotate(note: $note, idempotencyKey: $key) }',
      { note: deep, key: deepKey },
    );
    expect(codeOf(unreadable.body)).toBe('IDEMPOTENCY_BODY_UNREADABLE');
    expect(fixture.calls.count('annotate', deepKey)).toBe(0);
    for (const answer of [tooLong, missing, empty, unreadable]) {
      expect(answer.text).not.toMatch(/INTERNAL_SERVER_ERROR|stacktrace/);
    }
    expect(log.lines.slice(logged).filter((line) => line.level === 'error')).toEqual([]);
  });
});

describe('GraphQL resolvers at startup, as apps write them', () => {
  it('refuses @Idempotent() on a @ResolveField() (a namespaced mutation), which it could never protect', async () => {
    const sqlite = testDatabases.find((database) => database.name === 'sqlite')!;
    await expect(
      createReliabilityApp(
        sqlite,
        {},
        {
          imports: () => [
            GraphQLModule.forRoot<ApolloDriverConfig>({
              driver: ApolloDriver,
              autoSchemaFile: true,
            }),
          ],
          providers: [AccountsResolver, AccountMutationsResolver, EmailScalar],
        },
      ),
    ).rejects.toThrow(/AccountMutationsResolver\.open: it is a @ResolveField\(\)/);
  });
});

/** Schema first: resolvers returning Dates and class instances, errors of their own classes. */
const SCHEMA_FIRST_TYPE_DEFS = /* GraphQL */ `
  scalar DateTime
  type Parcel {
    id: ID!
    sentAt: DateTime!
    sentAtText: String!
    weighedAt: Float
    stops: [Stop]
  }
  type Stop {
    city: String!
    at: DateTime
  }
  type Shipped {
    parcel: Parcel!
  }
  type Held {
    reason: String!
    since: DateTime!
  }
  union Shipment = Shipped | Held
  type Query {
    ping: String!
  }
  type Mutation {
    sendParcel(weight: Int!, idempotencyKey: String): Parcel!
    ship(hold: Boolean!, idempotencyKey: String): Shipment!
    refuseParcel(idempotencyKey: String): Parcel
    pay(amount: Int!): Parcel!
    refund(amount: Int!): Parcel!
  }
`;

class Parcel {
  constructor(
    readonly id: string,
    readonly sentAt: Date,
    readonly sentAtText: Date,
    readonly weighedAt: Date,
    readonly stops: ({ city: string; at: Date | null } | null)[],
  ) {}
}
class Shipped {
  constructor(readonly parcel: Parcel) {}
}
class Held {
  constructor(
    readonly reason: string,
    readonly since: Date,
  ) {}
}

/** A business refusal of its own class, whose body has no message: its class names it. */
class OutOfStockException extends HttpException {
  constructor() {
    super({ reason: 'out_of_stock', attempt: randomUUID() }, HttpStatus.CONFLICT);
  }
}

/** Turns the app's own exception into the GraphQL error its clients expect. */
@Catch(OutOfStockException)
class OutOfStockFilter implements GqlExceptionFilter {
  catch(exception: OutOfStockException) {
    return new GraphQLError('Out of stock', {
      extensions: { code: 'OUT_OF_STOCK', detail: exception.getResponse() },
    });
  }
}

function parcel(weight: number) {
  const sentAt = new Date();
  return new Parcel(randomUUID(), sentAt, sentAt, new Date(Date.now() - weight), [
    { city: 'Lyon', at: new Date() },
    null,
    { city: 'Turin', at: null },
  ]);
}

/**
 * An `isTypeOf` by class, accepting the stored object of a replay too (it carries `__typename`),
 * as the README asks of a `resolveType` or `isTypeOf` of one's own.
 */
const isTypeOf =
  (type: Function) =>
  (value: unknown): boolean =>
    value instanceof type || (value as { __typename?: unknown }).__typename === type.name;

@Resolver()
class ParcelsResolver {
  constructor(private readonly calls: CallLog) {}

  @Query('ping')
  ping() {
    return 'pong';
  }

  @Mutation('sendParcel')
  @Idempotent()
  send(@Args('weight') weight: number, @Args('idempotencyKey') key?: string) {
    this.calls.record('sendParcel', key);
    return parcel(weight);
  }

  @Mutation('ship')
  @Idempotent()
  ship(@Args('hold') hold: boolean, @Args('idempotencyKey') key?: string) {
    this.calls.record('ship', key);
    return hold ? new Held('customs', new Date()) : new Shipped(parcel(1));
  }

  @Mutation('refuseParcel')
  @Idempotent()
  @UseFilters(OutOfStockFilter)
  refuse(@Args('idempotencyKey') key?: string) {
    this.calls.record('refuseParcel', key);
    throw new OutOfStockException();
  }

  @Mutation('pay')
  @Idempotent()
  pay(@Args('amount') amount: number) {
    this.calls.record('pay', String(amount));
    return parcel(amount);
  }

  @Mutation('refund')
  @Idempotent()
  refund(@Args('amount') amount: number) {
    this.calls.record('refund', String(amount));
    return parcel(amount);
  }
}

describe.each(['express', 'fastify'] as const)(
  'GraphQL schema first as apps write it, on %s',
  (platform) => {
    let fixture: ReliabilityApp;
    let client: HttpClient;
    const log = new CapturedLog();

    beforeAll(async () => {
      fixture = await createReliabilityApp(
        pglite,
        {},
        {
          platform,
          logger: log,
          imports: () => [
            apolloModule(platform, {
              typeDefs: SCHEMA_FIRST_TYPE_DEFS,
              allowBatchedHttpRequests: true,
              resolvers: {
                DateTime: GraphQLISODateTime,
                // Types told apart by their class, as graphql-js' own examples do.
                Parcel: { __isTypeOf: isTypeOf(Parcel) },
                Shipped: { __isTypeOf: isTypeOf(Shipped) },
                Held: { __isTypeOf: isTypeOf(Held) },
              },
            }),
          ],
          providers: [ParcelsResolver],
        },
      );
      client = new HttpClient(fixture.baseUrl, 4);
    });
    afterAll(async () => {
      client.close();
      await fixture.close();
    });

    const send = (body: unknown, headers: Record<string, string> = {}) =>
      postGraphQL(client, body as object, headers);
    const graphql = (query: string, variables: Record<string, unknown> = {}) =>
      send({ query, variables });

    it('replays Dates a resolver returned for DateTime, String and Float fields, in lists with nulls, in a type with isTypeOf', async () => {
      const key = randomUUID();
      const query = `mutation S($key: String) {
      sendParcel(weight: 3, idempotencyKey: $key) { id sentAt sentAtText weighedAt stops { city at } }
    }`;
      const first = await graphql(query, { key });
      expect(first.body.errors).toBeUndefined();
      expect(first.body.data.sendParcel.sentAt).toMatch(/^\d{4}-/);
      expect((await graphql(query, { key })).text).toBe(first.text);
      expect(fixture.calls.count('sendParcel', key)).toBe(1);
    });

    it('replays types and union members told apart by isTypeOf (their class, or __typename)', async () => {
      for (const hold of [false, true]) {
        const key = randomUUID();
        const query = `mutation U($hold: Boolean!, $key: String) {
        ship(hold: $hold, idempotencyKey: $key) {
          __typename ... on Shipped { parcel { id sentAt } } ... on Held { reason since }
        }
      }`;
        const first = await graphql(query, { hold, key });
        expect(first.body.errors).toBeUndefined();
        expect((await graphql(query, { hold, key })).text).toBe(first.text);
        expect(fixture.calls.count('ship', key)).toBe(1);
      }
    });

    it('replays an exception of its own class as its filter answered it the first time', async () => {
      const key = randomUUID();
      const query = 'mutation R($key: String) { refuseParcel(idempotencyKey: $key) { id } }';
      const first = await graphql(query, { key });
      expect(first.body.errors?.[0]?.extensions?.code).toBe('OUT_OF_STOCK');
      expect((await graphql(query, { key })).text).toBe(first.text);
      expect(fixture.calls.count('refuseParcel', key)).toBe(1);
    });

    it('treats batched operations under one header key as operations of their own', async () => {
      const key = randomUUID();
      const headers = { 'Idempotency-Key': key };
      const batch = [
        { query: 'mutation { pay(amount: 401) { id } }' },
        { query: 'mutation { refund(amount: 401) { id } }' },
      ];
      const first = await send(batch, headers);
      expect(first.body).toEqual([
        { data: { pay: { id: expect.any(String) } } },
        { data: { refund: { id: expect.any(String) } } },
      ]);
      expect((await send(batch, headers)).text).toBe(first.text);
      expect(fixture.calls.count('pay', '401')).toBe(1);
      expect(fixture.calls.count('refund', '401')).toBe(1);
    });

    it('runs an automatic persisted query once per key, and replays it from its hash', async () => {
      const key = randomUUID();
      const query =
        'mutation P($key: String) { sendParcel(weight: 402, idempotencyKey: $key) { id } }';
      const sha256Hash = createHash('sha256').update(query).digest('hex');
      const extensions = { persistedQuery: { version: 1, sha256Hash } };
      const unknown = await send({ variables: { key }, extensions });
      expect(unknown.body.errors?.[0]?.extensions?.code).toBe('PERSISTED_QUERY_NOT_FOUND');
      const first = await send({ query, variables: { key }, extensions });
      expect(first.body.errors).toBeUndefined();
      expect((await send({ variables: { key }, extensions })).text).toBe(first.text);
      expect(fixture.calls.count('sendParcel', key)).toBe(1);
    });
  },
);
