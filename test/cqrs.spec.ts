import { Test } from '@nestjs/testing';
import type { INestApplicationContext } from '@nestjs/common';
import { CommandBus, CqrsModule, EventBus } from '@nestjs/cqrs';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  IdempotencyModule,
  IdempotencyPayloadMismatchError,
  IdempotencyRecord,
} from '../lib/index.js';
import {
  ledger,
  ReceiptHandler,
  TransferCommand,
  TransferHandler,
  TransferredEvent,
} from './fixtures/cqrs-transfers.js';
import { testDatabases } from './support/databases.js';
import { runTag } from './support/reliability.js';

const databases = testDatabases
  .filter((database) => database.name === 'pglite' || database.name === 'postgres')
  .map((database) => [database.name, database] as const);

describe.each(databases)('@nestjs/cqrs handlers on %s', (_name, database) => {
  let app: INestApplicationContext;
  let dataSource: DataSource;

  beforeAll(async () => {
    ledger.table = runTag('cqrs_ledger');
    dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
    await dataSource.initialize();
    await dataSource.query(
      `CREATE TABLE ${ledger.table} (id serial PRIMARY KEY, key text NOT NULL, source text NOT NULL, amount int NOT NULL)`,
    );
    const moduleRef = await Test.createTestingModule({
      imports: [
        CqrsModule.forRoot(),
        IdempotencyModule.forRoot({ dataSource, purgeInterval: false }),
      ],
      providers: [TransferHandler, ReceiptHandler],
    }).compile();
    app = await moduleRef.init();
  });
  afterAll(async () => {
    await app?.close();
    await dataSource?.query(`DROP TABLE IF EXISTS ${ledger.table}`);
    await dataSource?.destroy();
  });

  const ledgerOf = async (key: string) =>
    (await dataSource.query(`SELECT id FROM ${ledger.table} WHERE key = $1`, [key])) as {
      id: number;
    }[];

  it('executing the same command twice (and three times at once) runs its handler once', async () => {
    const bus = app.get(CommandBus);
    const handler = app.get(TransferHandler);
    const transferId = randomUUID();
    const runsBefore = handler.runs;
    const first = await bus.execute(new TransferCommand(transferId, 25));
    const again = await bus.execute(new TransferCommand(transferId, 25));
    const together = await Promise.all(
      [1, 2, 3].map(() => bus.execute(new TransferCommand(transferId, 25))),
    );
    expect(handler.runs - runsBefore).toBe(1);
    const rows = await ledgerOf(transferId);
    expect(rows).toHaveLength(1);
    expect(first).toEqual({ entry: rows[0].id });
    for (const result of [again, ...together]) expect(result).toEqual(first);

    await expect(bus.execute(new TransferCommand(transferId, 26))).rejects.toBeInstanceOf(
      IdempotencyPayloadMismatchError,
    );
    expect(await ledgerOf(transferId)).toHaveLength(1);
  });

  it('an event handler through IdempotencyRunner.run handles a redelivered event once', async () => {
    const receipts = app.get(ReceiptHandler);
    const events = app.get(EventBus);
    const transferId = randomUUID();
    await Promise.all(receipts.handled);
    receipts.handled = [];
    await app.get(CommandBus).execute(new TransferCommand(transferId, 10));
    // The handler published it once; it is published again twice (a redelivery, a replayed outbox).
    events.publish(new TransferredEvent(transferId, 10));
    events.publish(new TransferredEvent(transferId, 10));
    await waitUntil(() => receipts.handled.length === 3);
    await Promise.all(receipts.handled);
    expect(receipts.runs.get(transferId)).toBe(1);
  });
});

async function waitUntil(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
