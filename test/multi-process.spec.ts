import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { EFFECTS_TABLE } from './fixtures/effects-table.js';
import { testDatabases, type TestDatabase } from './support/databases.js';
import { startAppProcess, type AppProcess } from './support/processes.js';

const shared = testDatabases.filter((database) => database.shared);
const describeShared =
  shared.length > 0
    ? describe.each(shared.map((d) => [d.name, d] as const))
    : describe.skip.each([['no shared database (set DATABASE_URL)', undefined]]);

describeShared('two app processes on one %s', (_name, database) => {
  let processes: AppProcess[] = [];
  let dataSource: DataSource;

  beforeAll(async () => {
    const url = (database as TestDatabase).options() as { url: string };
    processes = await Promise.all([
      startAppProcess('test/fixtures/effects-server.js', { DATABASE_URL: url.url }),
      startAppProcess('test/fixtures/effects-server.js', { DATABASE_URL: url.url }),
    ]);
    dataSource = new DataSource({ type: 'postgres', url: url.url });
    await dataSource.initialize();
  });
  afterAll(async () => {
    await Promise.all(processes.map((p) => p.stop()));
    await dataSource?.destroy();
  });

  it('executes each key once when its duplicates hit both processes at the same time', async () => {
    const keys = Array.from({ length: 20 }, () => randomUUID());
    const sends = keys.flatMap((key) =>
      Array.from({ length: 6 }, (_, i) =>
        fetch(`${processes[i % 2].baseUrl}/effects`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
          body: JSON.stringify({ amount: 10 }),
        }).then(async (response) => ({
          key,
          status: response.status,
          body: (await response.json()) as { effect: number },
        })),
      ),
    );
    const responses = await Promise.all(sends);

    const rows: { idempotency_key: string; count: string }[] = await dataSource.query(
      `SELECT idempotency_key, count(*) FROM ${EFFECTS_TABLE} WHERE idempotency_key = ANY($1) GROUP BY idempotency_key`,
      [keys],
    );
    expect(rows).toHaveLength(keys.length);
    for (const row of rows) expect(Number(row.count)).toBe(1);

    for (const key of keys) {
      const ofKey = responses.filter((r) => r.key === key);
      const successes = ofKey.filter((r) => r.status === 201);
      expect(successes.length).toBeGreaterThanOrEqual(1);
      expect(new Set(successes.map((r) => r.body.effect)).size).toBe(1);
      for (const response of ofKey) expect([201, 409]).toContain(response.status);
    }
  });
});
