import { createFixtureApp } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

describe.each(eachDatabase)('an unreachable database on %s', (_name, database) => {
  it('answers 503 problem+json and never runs the handler without a claim', async () => {
    const fixture = await createFixtureApp(database);
    try {
      const key = newKey();
      await fixture.dataSource.destroy();
      const response = await post(fixture.http, '/charges', key, { amount: 1 });
      expectProblem(response, 503, 'store-unavailable');
      expect(response.headers['retry-after']).toBe('1');
      expect(fixture.calls.count('charges', key)).toBe(0);
    } finally {
      await fixture.close();
    }
  });
});

describe.each(eachDatabase)('a database lost while the handler runs, on %s', (_name, database) => {
  it("still returns the handler's response when its result cannot be stored", async () => {
    const fixture = await createFixtureApp(database);
    try {
      const key = newKey();
      fixture.gate.hold(key);
      const pending = post(fixture.http, '/slow', key).then((response) => response);
      await fixture.gate.arrived(key);
      await fixture.dataSource.destroy();
      fixture.gate.open(key);
      const response = await pending;
      expect(response.status).toBe(201);
      expect(response.body.id).toEqual(expect.any(String));
      expect(fixture.calls.count('slow', key)).toBe(1);
    } finally {
      await fixture.close();
    }
  });
});
