import type { INestApplication } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
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
    app = await createSampleApp(
      name === 'pglite'
        ? { dataDir: 'memory://', gatewayLatencyMs: 20, logger: false }
        : { databaseUrl: url, gatewayLatencyMs: 20, logger: false },
    );
    await app.init();
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

  async function paymentsWith(reference: string): Promise<number> {
    const all = await request(http()).get('/payments').expect(200);
    return all.body.filter((p: { reference?: string }) => p.reference === reference).length;
  }
});
