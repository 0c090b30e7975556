import type { INestApplication } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { createSampleApp } from '../sample/app.factory.js';

/** The sample's prom-client wiring: GET /metrics in Prometheus text format. */
describe('the sample shop exports idempotency metrics to Prometheus', () => {
  let app: INestApplication;
  beforeAll(async () => {
    app = await createSampleApp({ dataDir: 'memory://', gatewayLatencyMs: 0, logger: false });
    await app.init();
  });
  afterAll(() => app.close());

  async function scrape() {
    const response = await request(app.getHttpServer()).get('/metrics').expect(200);
    expect(response.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
    return response.text;
  }

  function sample(text: string, series: string): number {
    const line = text.split('\n').find((candidate) => candidate.startsWith(`${series} `));
    if (!line) throw new Error(`no ${series} in:\n${text}`);
    return Number(line.slice(series.length + 1));
  }

  it('counts a first request as executed and its retry as replayed', async () => {
    const before = await scrape();
    const key = randomUUID();
    const payment = { amount: 700, currency: 'eur', source: 'tok_visa' };
    const first = await request(app.getHttpServer())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send(payment)
      .expect(201);
    const retry = await request(app.getHttpServer())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send(payment)
      .expect(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    await request(app.getHttpServer())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send({ ...payment, amount: 701 })
      .expect(422);

    const after = await scrape();
    const increase = (series: string) => sample(after, series) - sample(before, series);
    expect(increase('idempotency_requests_total{outcome="executed"}')).toBe(1);
    expect(increase('idempotency_requests_total{outcome="replayed"}')).toBe(1);
    expect(increase('idempotency_requests_total{outcome="mismatch"}')).toBe(1);
    expect(increase('idempotency_requests_total{outcome="conflict"}')).toBe(0);
    expect(after).toContain('# TYPE idempotency_requests_total counter');
    expect(after).toContain('# TYPE idempotency_keys_released_total counter');
    // prom-client's default process metrics sit beside them.
    expect(after).toMatch(/^process_cpu_user_seconds_total \d/m);
  });
});
