import type { INestApplication } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { createSampleApp } from '../sample/app.factory.js';
import { eachDatabase } from './support/databases.js';

describe.each(eachDatabase)('the sample shop on %s', (name) => {
  let app: INestApplication;
  beforeAll(async () => {
    app = await createSampleApp(
      name === 'pglite'
        ? { dataDir: 'memory://', gatewayLatencyMs: 20, logger: false }
        : { databaseUrl: process.env.DATABASE_URL, gatewayLatencyMs: 20, logger: false },
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
});
