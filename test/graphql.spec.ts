import { Args, Mutation, Query, Resolver } from '@nestjs/graphql';
import { randomUUID } from 'node:crypto';
import { Idempotent } from '../lib/index.js';
import { PaymentsResolver, PAYMENTS_TYPE_DEFS } from './fixtures/graphql-payments.resolver.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { testDatabases } from './support/databases.js';
import { apolloModule, codeOf, postGraphQL, type GraphQLAnswer } from './support/graphql.js';
import { HttpClient } from './support/http-client.js';
import { CapturedLog } from './support/captured-log.js';

type Payments = GraphQLAnswer<Record<string, { id: string; amount: number } | null>>;

const pglite = testDatabases.find((database) => database.name === 'pglite')!;
const PAY =
  'mutation Pay($amount: Int!, $key: String) { pay(amount: $amount, idempotencyKey: $key) { id amount } }';

describe.each(['express', 'fastify'] as const)('GraphQL mutations on %s (Apollo)', (platform) => {
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
        imports: () => [apolloModule(platform, { typeDefs: PAYMENTS_TYPE_DEFS })],
        providers: [PaymentsResolver],
      },
    );
    client = new HttpClient(fixture.baseUrl, 8);
  });
  afterAll(async () => {
    client.close();
    await fixture.close();
  });

  const graphql = (
    query: string,
    variables: Record<string, unknown> = {},
    headers: Record<string, string> = {},
  ) => postGraphQL<Payments>(client, { query, variables }, headers);

  it('runs a mutation once per idempotencyKey argument and replays its result', async () => {
    const key = randomUUID();
    const first = await graphql(PAY, { amount: 10, key });
    const again = await graphql(PAY, { amount: 10, key });
    expect(first.body.errors).toBeUndefined();
    expect(again.body.data).toEqual(first.body.data);
    expect(fixture.calls.count('pay', key)).toBe(1);
  });

  it('takes the key from the Idempotency-Key header when the argument is absent', async () => {
    const key = randomUUID();
    const query = 'mutation { pay(amount: 11) { id amount } }';
    const first = await graphql(query, {}, { 'Idempotency-Key': key });
    const again = await graphql(query, {}, { 'Idempotency-Key': key });
    expect(first.body.data?.pay?.amount).toBe(11);
    expect(again.body.data).toEqual(first.body.data);
    expect(fixture.calls.count('pay', '11')).toBe(1);
  });

  it('keeps each mutation field of a document a record of its own (alias), even under one header key', async () => {
    const key = randomUUID();
    const query = 'mutation { a: pay(amount: 12) { id } b: pay(amount: 12) { id } }';
    const first = await graphql(query, {}, { 'Idempotency-Key': key });
    const again = await graphql(query, {}, { 'Idempotency-Key': key });
    expect(first.body.data?.a?.id).not.toBe(first.body.data?.b?.id);
    expect(again.body.data).toEqual(first.body.data);
    expect(fixture.calls.count('pay', '12')).toBe(2);
  });

  it('answers IDEMPOTENCY_KEY_REUSED for other arguments under a used key; the original still replays', async () => {
    const key = randomUUID();
    const first = await graphql(PAY, { amount: 13, key });
    const other = await graphql(PAY, { amount: 14, key });
    expect(other.body.data).toBeNull();
    expect(codeOf(other.body)).toBe('IDEMPOTENCY_KEY_REUSED');
    expect(other.body.errors?.[0]?.extensions?.status).toBe(422);
    expect(other.body.errors?.[0]?.path).toEqual(['pay']);
    expect((await graphql(PAY, { amount: 13, key })).body.data).toEqual(first.body.data);
    // A refusal is an answer to the client, not a crash of the server: nothing logged as an error.
    expect(log.lines.filter((line) => line.context === 'ExceptionsHandler')).toEqual([]);
  });

  it('answers IDEMPOTENCY_KEY_MISSING without a key, and leaves queries alone', async () => {
    const missing = await graphql('mutation { pay(amount: 15) { id } }');
    expect(codeOf(missing.body)).toBe('IDEMPOTENCY_KEY_MISSING');
    expect(fixture.calls.count('pay', '15')).toBe(0);
    const query = await graphql('{ ping }');
    expect(query.body).toEqual({ data: { ping: 'pong' } });
  });

  it('answers IDEMPOTENCY_REQUEST_IN_PROGRESS to a duplicate while the first runs, with retryAfterSeconds', async () => {
    const key = randomUUID();
    const query =
      'mutation Held($key: String) { heldPay(amount: 16, idempotencyKey: $key) { id } }';
    fixture.gate.hold(key);
    const first = graphql(query, { key });
    await fixture.gate.arrived(key);
    const duplicate = await graphql(query, { key });
    expect(codeOf(duplicate.body)).toBe('IDEMPOTENCY_REQUEST_IN_PROGRESS');
    expect(duplicate.body.errors?.[0]?.extensions?.retryAfterSeconds).toBe(1);
    fixture.gate.open(key);
    expect((await first).body.data?.heldPay?.id).toEqual(expect.any(String));
    expect(fixture.calls.count('heldPay', key)).toBe(1);
  });

  it('replays a stored business error as the same GraphQL error, and releases the key after a crash', async () => {
    const key = randomUUID();
    const declined =
      'mutation D($key: String) { declinedPay(amount: 1, idempotencyKey: $key) { id } }';
    const first = await graphql(declined, { key });
    const again = await graphql(declined, { key });
    expect(first.body.errors?.[0]?.message).toEqual(expect.any(String));
    expect(again.body.errors).toEqual(first.body.errors);
    expect(fixture.calls.count('declinedPay', key)).toBe(1);

    const crashKey = randomUUID();
    const crashing =
      'mutation C($key: String) { crashingPay(amount: 1, idempotencyKey: $key) { id } }';
    await graphql(crashing, { key: crashKey });
    await graphql(crashing, { key: crashKey });
    expect(fixture.calls.count('crashingPay', crashKey)).toBe(2);
  });
});

/** The same mutation, in the transactional mode, which SQLite cannot run. */
@Resolver()
class TransactionalPaymentsResolver {
  @Query('ping')
  ping() {
    return 'pong';
  }

  @Mutation('pay')
  @Idempotent({ transactional: true })
  pay(@Args('amount') amount: number) {
    return { id: randomUUID(), amount };
  }
}

describe('GraphQL resolvers at startup', () => {
  it('refuses a transactional @Idempotent() resolver on a store that cannot run it, naming it', async () => {
    const sqlite = testDatabases.find((database) => database.name === 'sqlite')!;
    await expect(
      createReliabilityApp(
        sqlite,
        {},
        {
          imports: () => [apolloModule('express', { typeDefs: PAYMENTS_TYPE_DEFS })],
          providers: [TransactionalPaymentsResolver],
        },
      ),
    ).rejects.toThrow(
      /transactional routes \(TransactionalPaymentsResolver\.pay\) cannot run on this store/,
    );
  });
});
