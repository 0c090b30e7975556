import { randomUUID } from 'node:crypto';
import { IdempotencyRecord } from '../lib/index.js';
import { InvoicesResolver } from './fixtures/graphql-invoices.resolver.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { eachTarget } from './support/databases.js';
import { apolloModule, codeOf, postGraphQL, type GraphQLAnswer } from './support/graphql.js';
import { HttpClient } from './support/http-client.js';

type Invoices = GraphQLAnswer<Record<string, Record<string, unknown> | string | null>>;

const PAYMENT_METHOD =
  '__typename ... on Card { last4 expiresAt } ... on BankTransfer { iban bookedAt }';
const CREATE_INVOICE = `mutation Create($customer: String!, $key: String) {
  createInvoice(customer: $customer, idempotencyKey: $key) {
    id reference createdAt dueAt paidAt sequence status plan total label
    lines { sku price addedAt tags }
    grid
    paidWith { ${PAYMENT_METHOD} }
    attempts { ${PAYMENT_METHOD} }
    billedTo { __typename name since ... on Company { vatId } ... on Person { email } }
  }
}`;

describe.each(eachTarget)('GraphQL code first on %s (Apollo)', (_name, { database, platform }) => {
  let fixture: ReliabilityApp;
  let client: HttpClient;

  beforeAll(async () => {
    fixture = await createReliabilityApp(
      database,
      {},
      {
        platform,
        imports: () => [apolloModule(platform, { autoSchemaFile: true })],
        providers: [InvoicesResolver],
      },
    );
    client = new HttpClient(fixture.baseUrl, 4);
  });
  afterAll(async () => {
    client.close();
    await fixture.close();
  });

  const graphql = (query: string, variables: Record<string, unknown> = {}) =>
    postGraphQL<Invoices>(client, { query, variables });

  it('replays an entity with Dates, custom scalars, an enum, nested lists, a getter, a union and an interface byte for byte, the mutation run once', async () => {
    const key = randomUUID();
    const first = await graphql(CREATE_INVOICE, { customer: 'ACME', key });
    expect(first.body.errors).toBeUndefined();
    const invoice = first.body.data?.createInvoice as Record<string, unknown>;
    expect(invoice).toMatchObject({
      createdAt: expect.stringMatching(/^\d{4}-\d\d-\d\dT/),
      dueAt: null,
      sequence: expect.stringMatching(/^\d+$/),
      reference: `INV-${invoice.sequence as string}`,
      status: 'Paid',
      plan: 'TEAM',
      total: expect.stringMatching(/^15\.50 EUR$/),
      grid: [[1, 2], [], [3]],
      paidWith: { __typename: 'Card', last4: expect.any(String) },
      attempts: [{ __typename: 'Card' }, { __typename: 'BankTransfer' }],
      billedTo: { __typename: 'Company', name: 'ACME' },
    });

    const again = await graphql(CREATE_INVOICE, { customer: 'ACME', key });
    expect(again.body.errors).toBeUndefined();
    expect(again.text).toBe(first.text);
    expect(fixture.calls.count('createInvoice', key)).toBe(1);
    // The field resolver serves each response from the stored invoice, its Dates and Money revived.
    expect(fixture.calls.count('label', invoice.id as string)).toBe(2);
  });

  it('stores a plain answer as the JSON the resolver returned, as earlier versions did, and replays it', async () => {
    const key = randomUUID();
    const query =
      'mutation R($key: String) { createReceipt(amount: 7, idempotencyKey: $key) { id amount status } }';
    const first = await graphql(query, { key });
    const again = await graphql(query, { key });
    expect(first.body.errors).toBeUndefined();
    expect(again.text).toBe(first.text);
    expect(fixture.calls.count('createReceipt', key)).toBe(1);
    const row = await fixture.dataSource.getRepository(IdempotencyRecord).findOneByOrFail({ key });
    const receipt = first.body.data?.createReceipt as { id: string };
    expect(JSON.parse(row.responseBody!)).toEqual({ id: receipt.id, amount: 7, status: 'open' });
  });

  it('replays a scalar answer and fingerprints Date and custom scalar arguments by their value', async () => {
    const key = randomUUID();
    const query = `mutation S($at: DateTime!, $budget: Money!, $key: String) {
      schedule(at: $at, budget: $budget, idempotencyKey: $key)
    }`;
    const args = { at: '2030-05-01T10:00:00.000Z', budget: '100.00 EUR', key };
    const first = await graphql(query, args);
    expect(first.body.errors).toBeUndefined();
    expect((await graphql(query, args)).text).toBe(first.text);
    expect(fixture.calls.count('schedule', key)).toBe(1);

    const otherBudget = await graphql(query, { ...args, budget: '999.00 EUR' });
    expect(codeOf(otherBudget.body)).toBe('IDEMPOTENCY_KEY_REUSED');
    const otherDate = await graphql(query, { ...args, at: '2030-05-02T10:00:00.000Z' });
    expect(codeOf(otherDate.body)).toBe('IDEMPOTENCY_KEY_REUSED');
    expect(fixture.calls.count('schedule', key)).toBe(1);
  });

  it('takes a BigInt argument and replays a BigInt answer', async () => {
    const key = randomUUID();
    const query =
      'mutation N($after: BigInt!, $key: String) { reserveNumber(after: $after, idempotencyKey: $key) }';
    const first = await graphql(query, { after: '9007199254740993', key });
    expect(first.body.errors).toBeUndefined();
    expect(BigInt(first.body.data?.reserveNumber as string)).toBeGreaterThan(9007199254740993n);
    expect((await graphql(query, { after: '9007199254740993', key })).text).toBe(first.text);
    expect(fixture.calls.count('reserveNumber', key)).toBe(1);
    const other = await graphql(query, { after: '9007199254740994', key });
    expect(codeOf(other.body)).toBe('IDEMPOTENCY_KEY_REUSED');
  });

  it('replays a resolver that answered null', async () => {
    const key = randomUUID();
    const query = 'mutation V($key: String) { voidInvoice(idempotencyKey: $key) { id } }';
    const first = await graphql(query, { key });
    expect(first.body).toEqual({ data: { voidInvoice: null } });
    expect((await graphql(query, { key })).text).toBe(first.text);
    expect(fixture.calls.count('voidInvoice', key)).toBe(1);
  });

  it('stores a business error with a code of its own and replays it; the resolver runs once', async () => {
    const key = randomUUID();
    const query = 'mutation P($key: String) { payInvoice(idempotencyKey: $key) { id } }';
    const first = await graphql(query, { key });
    const again = await graphql(query, { key });
    expect(codeOf(first.body)).toBe('INSUFFICIENT_FUNDS');
    expect(first.body.errors?.[0]?.extensions?.attempt).toEqual(expect.any(String));
    expect(again.text).toBe(first.text);
    expect(fixture.calls.count('payInvoice', key)).toBe(1);
  });

  it('releases BAD_USER_INPUT, and a code of its own on a route whose storeStatuses keeps only 200', async () => {
    const key = randomUUID();
    const rejected = 'mutation J($key: String) { rejectInvoice(idempotencyKey: $key) { id } }';
    expect(codeOf((await graphql(rejected, { key })).body)).toBe('BAD_USER_INPUT');
    expect(codeOf((await graphql(rejected, { key })).body)).toBe('BAD_USER_INPUT');
    expect(fixture.calls.count('rejectInvoice', key)).toBe(2);

    const retried = 'mutation O($key: String) { payInvoiceOrRetry(idempotencyKey: $key) { id } }';
    expect(codeOf((await graphql(retried, { key })).body)).toBe('INSUFFICIENT_FUNDS');
    expect(codeOf((await graphql(retried, { key })).body)).toBe('INSUFFICIENT_FUNDS');
    expect(fixture.calls.count('payInvoiceOrRetry', key)).toBe(2);
  });
});
