import { HttpException } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import type { EntityManager } from 'typeorm';
import {
  downstreamKeyOf,
  IdempotencyConflictError,
  IdempotencyInvalidCallError,
  IdempotencyMetrics,
  IdempotencyPayloadMismatchError,
  IdempotencyRunError,
  IdempotencyRunner,
  IdempotencyStoreUnavailableError,
  type IdempotentRunContext,
} from '../lib/index.js';
import { createRunApiApp, PaymentsService, type RunApiApp } from './fixtures/run-api-app.js';
import { testDatabases } from './support/databases.js';
import { runTag } from './support/reliability.js';

/** The run API on the embedded PGlite and, with DATABASE_URL, PostgreSQL. */
const databases = testDatabases
  .filter((database) => database.name === 'pglite' || database.name === 'postgres')
  .map((database) => [database.name, database] as const);

/** A promise and the function that settles it: work held open until the test lets it finish. */
function gate() {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { open, opened };
}

describe.each(databases)('IdempotencyRunner on %s', (_name, database) => {
  let fixture: RunApiApp;
  let runner: IdempotencyRunner;
  const effects = runTag('run_api_effects');

  beforeAll(async () => {
    fixture = await createRunApiApp(database, { waitTimeout: '5s', waitPollInterval: '20ms' });
    runner = fixture.app.get(IdempotencyRunner);
    await fixture.dataSource.query(
      `CREATE TABLE ${effects} (id serial PRIMARY KEY, key text NOT NULL, amount int NOT NULL)`,
    );
  });
  afterAll(async () => {
    if (fixture?.dataSource.isInitialized)
      await fixture.dataSource.query(`DROP TABLE IF EXISTS ${effects}`);
    await fixture?.close();
  });

  const rowsOf = async (key: string) =>
    (await fixture.dataSource.query(`SELECT amount FROM ${effects} WHERE key = $1`, [key])) as {
      amount: number;
    }[];

  it('runs the work once per key: the second call gets the stored result without running it', async () => {
    const key = randomUUID();
    const metrics = fixture.app.get(IdempotencyMetrics);
    const before = metrics.snapshot();
    let runs = 0;
    const work = async () => ({ run: ++runs, at: new Date(0) });
    const first = await runner.runDetailed({ key, name: 'charge', payload: { amount: 5 } }, work);
    const second = await runner.runDetailed({ key, name: 'charge', payload: { amount: 5 } }, work);
    expect(runs).toBe(1);
    expect(first).toEqual({ value: { run: 1, at: new Date(0) }, replayed: false });
    // Replayed in its stored JSON form.
    expect(second).toEqual({ value: { run: 1, at: new Date(0).toJSON() }, replayed: true });
    const after = metrics.snapshot();
    expect(after.executed - before.executed).toBe(1);
    expect(after.replayed - before.replayed).toBe(1);
    // Another name or another scope is another key space: runs again.
    await runner.run({ key, name: 'refund', payload: { amount: 5 } }, work);
    await runner.run({ key, name: 'charge', payload: { amount: 5 }, scope: 42 }, work);
    expect(runs).toBe(3);
  });

  it('refuses the key with another payload: a typed mismatch error that says not to retry', async () => {
    const key = randomUUID();
    await runner.run({ key, name: 'charge', payload: { amount: 5 } }, async () => 'ok');
    let runs = 0;
    const refused = await runner
      .run({ key, name: 'charge', payload: { amount: 6 } }, async () => ++runs)
      .catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(IdempotencyPayloadMismatchError);
    expect(refused).toBeInstanceOf(IdempotencyRunError);
    expect(refused).not.toBeInstanceOf(HttpException);
    expect(refused).toMatchObject({
      code: 'key-reused',
      retryAfterMs: undefined,
      operation: 'charge',
      key,
      rejection: { status: 422 },
    });
    expect((refused as Error).message).toMatch(
      /different payload.*Retrying the same call will not help/,
    );
    expect(runs).toBe(0);
    // Key order does not matter: the payload is compared in canonical form.
    expect(
      await runner.run({ key, name: 'charge', payload: { amount: 5 } }, async () => 'again'),
    ).toBe('ok');
  });

  it("concurrency 'reject': a duplicate in flight gets a typed in-flight error with retryAfterMs", async () => {
    const key = randomUUID();
    const held = gate();
    let runs = 0;
    const first = runner.run({ key, name: 'charge', concurrency: 'reject' }, async () => {
      runs++;
      await held.opened;
      return 'first';
    });
    await waitUntil(() => runs === 1);
    const duplicate = await runner
      .run({ key, name: 'charge', concurrency: 'reject' }, async () => ++runs)
      .catch((error: unknown) => error);
    expect(duplicate).toBeInstanceOf(IdempotencyConflictError);
    expect(duplicate).toMatchObject({ code: 'request-in-progress', retryAfterMs: 1000 });
    expect((duplicate as Error).message).toMatch(
      /still running.*Retry the same call .* in 1000 ms/,
    );
    held.open();
    expect(await first).toBe('first');
    // Retried as told, it receives the first call's result.
    expect(
      await runner.run({ key, name: 'charge', concurrency: 'reject' }, async () => ++runs),
    ).toBe('first');
    expect(runs).toBe(1);
  });

  it("concurrency 'wait' (the default): duplicates in flight wait and receive the first call's result", async () => {
    const key = randomUUID();
    const held = gate();
    let runs = 0;
    const work = async () => {
      runs++;
      await held.opened;
      return { by: runs };
    };
    const first = runner.run({ key, name: 'charge' }, work);
    await waitUntil(() => runs === 1);
    const duplicates = [1, 2, 3].map(() => runner.runDetailed({ key, name: 'charge' }, work));
    setTimeout(held.open, 200);
    expect(await first).toEqual({ by: 1 });
    for (const duplicate of await Promise.all(duplicates))
      expect(duplicate).toEqual({ value: { by: 1 }, replayed: true });
    expect(runs).toBe(1);
  });

  it('a failure releases the key, so the next call runs the work again; a thrown HttpException the policy stores replays', async () => {
    const key = randomUUID();
    let runs = 0;
    await expect(
      runner.run({ key, name: 'charge' }, async () => {
        runs++;
        throw new Error('gateway down');
      }),
    ).rejects.toThrow('gateway down');
    expect(await runner.run({ key, name: 'charge' }, async () => `run ${++runs}`)).toBe('run 2');

    const service = fixture.app.get(PaymentsService);
    const refundId = randomUUID();
    const refusal = await service.refund(refundId, 500).catch((error: unknown) => error);
    const replay = await service.refund(refundId, 500).catch((error: unknown) => error);
    expect(service.runs.get(`refund ${refundId}`)).toBe(1);
    for (const thrown of [refusal, replay]) {
      expect(thrown).toBeInstanceOf(HttpException);
      expect((thrown as HttpException).getStatus()).toBe(409);
      expect((thrown as HttpException).getResponse()).toEqual({ code: 'too-much', amount: 500 });
    }
  });

  it('transactional mode: the work writes through ctx.entityManager, committed with its result or not at all', async () => {
    const key = randomUUID();
    let seen: IdempotentRunContext | undefined;
    const work = (amount: number, fail: boolean) => async (ctx: IdempotentRunContext) => {
      seen = ctx;
      const manager: EntityManager = ctx.entityManager!;
      await manager.query(`INSERT INTO ${effects} (key, amount) VALUES ($1, $2)`, [key, amount]);
      if (fail) throw new Error('after the write');
      return { amount };
    };
    await expect(
      runner.run({ key, name: 'transfer', transactional: true }, work(7, true)),
    ).rejects.toThrow('after the write');
    expect(seen?.entityManager).toBeDefined();
    expect(seen?.entityManager?.queryRunner?.isTransactionActive).toBe(false);
    expect(await rowsOf(key)).toEqual([]);

    expect(
      await runner.run({ key, name: 'transfer', transactional: true }, work(7, false)),
    ).toEqual({
      amount: 7,
    });
    expect(seen!.downstreamKey('ledger')).toBe(downstreamKeyOf(seen!, 'ledger'));
    expect(
      await runner.runDetailed({ key, name: 'transfer', transactional: true }, work(7, false)),
    ).toEqual({ value: { amount: 7 }, replayed: true });
    expect(await rowsOf(key)).toEqual([{ amount: 7 }]);
  });

  it('@IdempotentMethod(): a provider method whose key comes from its arguments runs once per key', async () => {
    const service = fixture.app.get(PaymentsService);
    const payment = { id: randomUUID(), amount: 30 };
    const [first, second] = await Promise.all([service.charge(payment), service.charge(payment)]);
    const third = await service.charge({ ...payment });
    expect(service.runs.get(`charge ${payment.id}`)).toBe(1);
    expect(second).toEqual(first);
    expect(third).toEqual(first);
    expect(first.charged).toBe(30);
    await expect(service.charge({ ...payment, amount: 31 })).rejects.toBeInstanceOf(
      IdempotencyPayloadMismatchError,
    );
  });

  it('refuses an unusable key with a typed error, without running the work', async () => {
    let runs = 0;
    for (const key of ['', 'é', 'x'.repeat(256), 1.5]) {
      const refused = await runner
        .run({ key, name: 'charge' }, async () => ++runs)
        .catch((error: unknown) => error);
      expect(refused).toBeInstanceOf(IdempotencyInvalidCallError);
      expect(refused).toMatchObject({ code: 'key-invalid', retryAfterMs: undefined });
    }
    expect(runs).toBe(0);
    // An integer key is the same key as its decimal string.
    const key = Date.now();
    await runner.run({ key, name: 'charge' }, async () => ++runs);
    await runner.run({ key: String(key), name: 'charge' }, async () => ++runs);
    expect(runs).toBe(1);
  });
});

describe.each(databases)('IdempotencyRunner with its store gone on %s', (_name, database) => {
  it('refuses with a typed store-unavailable error that says when to retry; the work does not run', async () => {
    const fixture = await createRunApiApp(database, { storeTimeout: '2s' });
    try {
      const runner = fixture.app.get(IdempotencyRunner);
      await fixture.dataSource.destroy();
      let runs = 0;
      const refused = await runner
        .run({ key: randomUUID(), name: 'charge' }, async () => ++runs)
        .catch((error: unknown) => error);
      expect(refused).toBeInstanceOf(IdempotencyStoreUnavailableError);
      expect(refused).toMatchObject({ code: 'store-unavailable', retryAfterMs: 1000 });
      expect((refused as Error).cause).toBeDefined();
      expect(runs).toBe(0);
    } finally {
      await fixture.close();
    }
  });
});

async function waitUntil(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
