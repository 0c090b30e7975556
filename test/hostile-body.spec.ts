import request from 'supertest';
import { createFixtureApp, recordsOf, type FixtureApp } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { newKey } from './support/http.js';

describe.each(eachDatabase)('bodies nobody planned for, on %s', (_name, database) => {
  let fixture: FixtureApp;
  beforeAll(async () => (fixture = await createFixtureApp(database)));
  afterAll(() => fixture.close());

  it('answers a deeply nested JSON body with a 4xx, never a 5xx', async () => {
    const key = newKey();
    const deep = '['.repeat(20_000) + ']'.repeat(20_000);
    const response = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', key)
      .set('Content-Type', 'application/json')
      .send(deep);
    expect(response.status).toBeGreaterThanOrEqual(400);
    expect(response.status).toBeLessThan(500);
    expect(fixture.calls.count('charges', key)).toBe(0);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
  });

  it('answers malformed JSON with a 400, leaving no record', async () => {
    const key = newKey();
    const response = await request(fixture.http)
      .post('/charges')
      .set('Idempotency-Key', key)
      .set('Content-Type', 'application/json')
      .send('{"amount": 1');
    expect(response.status).toBe(400);
    expect(await recordsOf(fixture.dataSource, key)).toHaveLength(0);
  });
});
