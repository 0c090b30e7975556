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
