import type { INestApplication } from '@nestjs/common';
import { randomInt, randomUUID } from 'node:crypto';
import request from 'supertest';
import { createSampleApp } from '../sample/app.factory.js';
import { eachDatabase } from './support/databases.js';

/** The sample runs on PGlite or PostgreSQL (directly, or through PgBouncer). */
const sampleDatabases = eachDatabase.filter(
  ([name, database]) => name === 'pglite' || database.options().type === 'postgres',
);

describe.each(sampleDatabases)('the sample shop on %s', (name, database) => {
  let app: INestApplication;
  beforeAll(async () => {
    const { url } = database.options() as { url?: string };
    // As under `npm start`, NODE_ENV unset: jest's NODE_ENV=test would hide what Apollo shows there
    // (stack traces in GraphQL errors).
    const nodeEnv = process.env.NODE_ENV;
    delete process.env.NODE_ENV;
    try {
      app = await createSampleApp(
        name === 'pglite'
          ? { dataDir: 'memory://', gatewayLatencyMs: 20, logger: false }
          : { databaseUrl: url, gatewayLatencyMs: 20, logger: false },
      );
      await app.init();
    } finally {
      process.env.NODE_ENV = nodeEnv;
    }
  });
  afterAll(() => app.close());

  const http = () => app.getHttpServer();

  it('charges once for a payment sent three times with one key', async () => {
    const key = randomUUID();
    const reference = `test-${randomUUID()}`;
    const payment = { amount: 1000, currency: 'eur', source: 'tok_visa', reference };
    const responses = await Promise.all(
      [0, 1, 2].map(() =>
        request(http()).post('/payments').set('Idempotency-Key', key).send(payment),
      ),
    );
    expect(responses.map((r) => r.status)).toEqual([201, 201, 201]);
    expect(new Set(responses.map((r) => r.body.id)).size).toBe(1);
    const all = await request(http()).get('/payments').expect(200);
    expect(all.body.filter((p: { reference?: string }) => p.reference === reference)).toHaveLength(
      1,
    );
  });

  it('replays a declined card (402) and moves money once for a retried transfer', async () => {
    const declinedKey = randomUUID();
    const declined = { amount: 5, currency: 'eur', source: 'card_declined' };
    await request(http())
      .post('/payments')
      .set('Idempotency-Key', declinedKey)
      .send(declined)
      .expect(402);
    const replay = await request(http())
      .post('/payments')
      .set('Idempotency-Key', declinedKey)
      .send(declined);
    expect(replay.status).toBe(402);
    expect(replay.headers['idempotent-replayed']).toBe('true');

    const before = (await request(http()).get('/accounts/acc_alice').expect(200)).body.balance;
    const key = randomUUID();
    const transfer = { from_account: 'acc_alice', to_account: 'acc_bob', amount: 1 };
    await request(http()).post('/transfers').set('Idempotency-Key', key).send(transfer).expect(201);
    await request(http()).post('/transfers').set('Idempotency-Key', key).send(transfer).expect(201);
    const after = (await request(http()).get('/accounts/acc_alice').expect(200)).body.balance;
    expect(Number(before) - Number(after)).toBe(1);
  });

  it('charges once for a GraphQL createPayment sent twice with one idempotencyKey', async () => {
    const key = randomUUID();
    const reference = `gql-${randomUUID()}`;
    const query = `mutation Pay($key: String, $reference: String) {
      createPayment(amount: 700, currency: "eur", source: "tok_visa", reference: $reference, idempotencyKey: $key) { id amount }
    }`;
    const send = () =>
      request(http()).post('/graphql').send({ query, variables: { key, reference } });
    const [first, second] = [await send(), await send()];
    expect(first.body.errors).toBeUndefined();
    expect(second.body.data).toEqual(first.body.data);
    const all = await request(http()).get('/payments').expect(200);
    expect(all.body.filter((p: { reference?: string }) => p.reference === reference)).toHaveLength(
      1,
    );
  });

  it('refuses a body its ValidationPipe rejects (400) and lets the corrected retry with the same key charge once', async () => {
    const key = randomUUID();
    const reference = `fix-${randomUUID()}`;
    const invalid = await request(http())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send({ amount: -5, currency: 'euro', source: 'tok_visa', reference });
    expect(invalid.status).toBe(400);
    expect(invalid.body.message).toEqual(
      expect.arrayContaining([
        'amount must not be less than 1',
        'currency must be a three-letter ISO 4217 code, e.g. "eur"',
      ]),
    );
    expect(await paymentsWith(reference)).toBe(0);

    // The 400 was not stored: the key was released, so the corrected body is a new first request.
    const corrected = { amount: 500, currency: 'EUR', source: 'tok_visa', reference };
    const first = await request(http())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send(corrected);
    expect(first.status).toBe(201);
    expect(first.headers['idempotent-replayed']).toBeUndefined();
    expect(first.body).toMatchObject({ amount: 500, currency: 'eur', reference });
    const retry = await request(http())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send(corrected);
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body.id).toBe(first.body.id);
    expect(await paymentsWith(reference)).toBe(1);
  });

  it('checks nested order items and a transfer to the same account with its DTOs (400, nothing stored)', async () => {
    const orderKey = randomUUID();
    const badOrder = await request(http())
      .post('/orders')
      .set('Idempotency-Key', orderKey)
      .send({ customer: 'alice', items: [{ sku: 'tea', quantity: 0 }] });
    expect(badOrder.status).toBe(400);
    expect(badOrder.body.message).toEqual(['items.0.quantity must not be less than 1']);
    await request(http())
      .post('/orders')
      .set('Idempotency-Key', orderKey)
      .send({ customer: ' alice ', items: [{ sku: 'tea', quantity: 2 }] })
      .expect(201)
      .expect(({ body }) => expect(body).toMatchObject({ customer: 'alice' }));

    const sameAccount = await request(http())
      .post('/transfers')
      .set('Idempotency-Key', randomUUID())
      .send({ from_account: 'acc_alice', to_account: 'acc_alice', amount: 1 });
    expect(sameAccount.status).toBe(400);
    expect(sameAccount.body.message).toEqual(['to_account must differ from from_account']);
  });

  it('refuses invalid GraphQL arguments through the same DTO, and the corrected mutation runs with the same key', async () => {
    const key = randomUUID();
    const reference = `gql-fix-${randomUUID()}`;
    const mutation = (amount: number) =>
      request(http())
        .post('/graphql')
        .send({
          query: `mutation Pay($key: String, $reference: String, $amount: Int!) {
            createPayment(amount: $amount, currency: "eur", source: "tok_visa", reference: $reference, idempotencyKey: $key) { id amount }
          }`,
          variables: { key, reference, amount },
        });
    const refused = await mutation(0);
    expect(refused.body.errors?.[0]?.message).toMatch(/Bad Request/);
    expect(refused.body.errors?.[0]?.extensions?.originalError?.message).toEqual([
      'amount must not be less than 1',
    ]);
    const accepted = await mutation(300);
    expect(accepted.body.errors).toBeUndefined();
    expect(accepted.body.data.createPayment.amount).toBe(300);
    expect(await paymentsWith(reference)).toBe(1);
  });

  it('refuses a NUL character in any text field with 400 (PostgreSQL text cannot hold one), and charges nothing', async () => {
    // An amount of its own, to find its charges among those of other tests on a shared database.
    const amount = randomInt(10_000_000, 100_000_000);
    const payment = { amount, currency: 'eur', source: 'tok_visa' };
    const order = { customer: 'alice', items: [{ sku: 'tea', quantity: 1 }] };
    const transfer = { from_account: 'acc_alice', to_account: 'acc_bob', amount: 1 };
    const refused: [string, object, string][] = [
      ['/payments', { ...payment, source: 'tok\u0000visa' }, 'source'],
      ['/payments', { ...payment, reference: 'order\u00001' }, 'reference'],
      ['/orders', { ...order, customer: 'ali\u0000ce' }, 'customer'],
      ['/orders', { ...order, items: [{ sku: 't\u0000ea', quantity: 1 }] }, 'items.0.sku'],
      ['/transfers', { ...transfer, from_account: 'acc_alice\u0000' }, 'from_account'],
      ['/transfers', { ...transfer, to_account: '\u0000acc_bob' }, 'to_account'],
    ];
    for (const [path, body, field] of refused) {
      const answer = await request(http())
        .post(path)
        .set('Idempotency-Key', randomUUID())
        .send(body);
      expect({ path, field, status: answer.status }).toEqual({ path, field, status: 400 });
      expect(answer.body.message).toEqual([`${field} must not contain a NUL character`]);
    }
    const account = await request(http()).get('/accounts/acc_alice%00');
    expect(account.status).toBe(404);
    expect(account.body.error).toBe('account_not_found');

    const graphql = await request(http())
      .post('/graphql')
      .send({
        query: `mutation Pay($key: String, $source: String!, $amount: Int!) {
          createPayment(amount: $amount, currency: "eur", source: $source, idempotencyKey: $key) { id }
        }`,
        variables: { key: randomUUID(), source: 'tok\u0000visa', amount },
      });
    expect(graphql.body.errors?.[0]?.extensions?.code).toBe('BAD_REQUEST');
    expect(graphql.body.errors?.[0]?.extensions?.originalError?.message).toEqual([
      'source must not contain a NUL character',
    ]);
    const charges = (await request(http()).get('/gateway/charges').expect(200)).body as {
      amount: number;
    }[];
    expect(charges.filter((charge) => charge.amount === amount)).toEqual([]);
  });

  it('answers GraphQL errors without a stack trace', async () => {
    const mutation = (amount: number, key?: string) =>
      request(http())
        .post('/graphql')
        .send({
          query: `mutation Pay($key: String, $amount: Int!) {
            createPayment(amount: $amount, currency: "eur", source: "tok_visa", idempotencyKey: $key) { id }
          }`,
          variables: { key, amount },
        });
    const noKey = await mutation(100);
    const invalid = await mutation(0, randomUUID());
    const declined = await request(http())
      .post('/graphql')
      .send({
        query: `mutation { createPayment(amount: 5, currency: "eur", source: "card_declined", idempotencyKey: "${randomUUID()}") { id } }`,
      });
    const errors = [noKey, invalid, declined].map((answer) => answer.body.errors?.[0]);
    expect(errors.map((error) => error?.extensions?.code)).toEqual([
      'IDEMPOTENCY_KEY_MISSING',
      'BAD_REQUEST',
      expect.any(String),
    ]);
    expect(errors[2].message).toBe('The card was declined.');
    for (const error of errors) {
      expect(error.extensions).not.toHaveProperty('stacktrace');
      expect(JSON.stringify(error)).not.toMatch(/\.[jt]s:\d+/);
    }
  });

  it('documents X-Api-Key as the optional scope of every operation, so Swagger UI sends it once authorised', async () => {
    const document = (await request(http()).get('/docs-json').expect(200)).body;
    expect(document.components.securitySchemes['api-key']).toEqual({
      type: 'apiKey',
      in: 'header',
      name: 'X-Api-Key',
    });
    // Swagger UI sends an authorised key only to operations whose security names its scheme; `{}`
    // keeps the key optional.
    expect(document.security).toEqual([{ 'api-key': [] }, {}]);

    // And it is the scope: one Idempotency-Key under two API keys is two payments.
    const key = randomUUID();
    const reference = `scope-${randomUUID()}`;
    const payment = { amount: 100, currency: 'eur', source: 'tok_visa', reference };
    const pay = (apiKey: string) =>
      request(http())
        .post('/payments')
        .set('Idempotency-Key', key)
        .set('X-Api-Key', apiKey)
        .send(payment);
    const alice = await pay('alice-key');
    const bob = await pay('bob-key');
    const aliceAgain = await pay('alice-key');
    expect([alice.status, bob.status, aliceAgain.status]).toEqual([201, 201, 201]);
    expect(bob.body.id).not.toBe(alice.body.id);
    expect(aliceAgain.body.id).toBe(alice.body.id);
    expect(await paymentsWith(reference)).toBe(2);
  });

  async function paymentsWith(reference: string): Promise<number> {
    const all = await request(http()).get('/payments').expect(200);
    return all.body.filter((p: { reference?: string }) => p.reference === reference).length;
  }
});
