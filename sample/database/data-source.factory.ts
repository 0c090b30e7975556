import { mkdirSync } from 'node:fs';
import { DataSource, type DataSourceOptions } from 'typeorm';
import { IdempotencyRecord, pgliteDriver } from '../../lib/index.js';
import type { DatabaseConfig } from '../config/sample.config.js';
import { GatewayCharge } from '../gateway/gateway-charge.entity.js';
import { GatewayWebhookAttempt, GatewayWebhookEvent } from '../gateway/gateway-webhook.entity.js';
import { Order } from '../orders/order.entity.js';
import { Payment } from '../payments/payment.entity.js';
import { Account } from '../transfers/account.entity.js';
import { Transfer } from '../transfers/transfer.entity.js';
import { ReceivedGatewayEvent } from '../webhooks/received-gateway-event.entity.js';
import { lockDataDir } from './data-dir.lock.js';

/** The sample's tables and the library's, in one DataSource: one connection pool, one database. */
export const SAMPLE_ENTITIES = [
  Payment,
  Order,
  Account,
  Transfer,
  GatewayCharge,
  GatewayWebhookEvent,
  GatewayWebhookAttempt,
  ReceivedGatewayEvent,
  IdempotencyRecord,
];

/** Any constant shared by every sample process: they take turns creating the schema. */
const SCHEMA_LOCK_ID = 727_274_001;

/**
 * typeorm-pglite keeps one PGlite database per process, whatever `dataDir` a second DataSource
 * asks for. A second app in the same process would silently share (and, on close, shut) the
 * first's database, so that is refused instead.
 */
let openPGlite: { readonly dataSource: DataSource; readonly unlock: () => void } | undefined;

export function currentPGliteDataSource(): DataSource | undefined {
  return openPGlite?.dataSource;
}

/** Opens the database and brings the schema up to date. */
export async function openSampleDataSource(database: DatabaseConfig): Promise<DataSource> {
  const dataSource =
    database.kind === 'pglite'
      ? claimPGlite(database.dataDir)
      : new DataSource(optionsFor(database));
  try {
    await dataSource.initialize();
    await synchronizeSchema(dataSource, database);
    return dataSource;
  } catch (error) {
    await closeSampleDataSource(dataSource);
    throw error;
  }
}

/** The process's one PGlite DataSource, once its folder exists and is locked. */
function claimPGlite(dataDir: string): DataSource {
  if (openPGlite) {
    throw new Error(
      'A sample app with PGlite is already open in this process (typeorm-pglite allows one PGlite database per process). Close it first, or use databaseUrl.',
    );
  }
  const unlock = prepareDataDir(dataDir);
  try {
    const dataSource = new DataSource(optionsFor({ kind: 'pglite', dataDir }));
    openPGlite = { dataSource, unlock };
    return dataSource;
  } catch (error) {
    unlock();
    throw error;
  }
}

export async function closeSampleDataSource(dataSource: DataSource): Promise<void> {
  try {
    if (dataSource.isInitialized) await dataSource.destroy();
  } finally {
    if (openPGlite?.dataSource === dataSource) {
      openPGlite.unlock();
      openPGlite = undefined;
    }
  }
}

/** Creates the folder (PGlite does not create parents) and locks it against other processes. */
function prepareDataDir(dataDir: string): () => void {
  if (dataDir.startsWith('memory://')) return () => undefined;
  mkdirSync(dataDir, { recursive: true });
  return lockDataDir(dataDir);
}

function optionsFor(database: DatabaseConfig): DataSourceOptions {
  const common = { entities: SAMPLE_ENTITIES, synchronize: false } as const;
  return database.kind === 'postgres'
    ? { type: 'postgres', url: database.url, ...common }
    : // The library's PGlite driver hands the one session to one query runner at a time, so a
      // transaction (a transfer) never takes in another request's statements.
      { type: 'postgres', driver: pgliteDriver({ dataDir: database.dataDir }), ...common };
}

/**
 * `synchronize` is fine for a sample (a real app would run migrations). It also creates the
 * idempotency table from the entity; the library's own migration then finds it and does nothing.
 */
async function synchronizeSchema(dataSource: DataSource, database: DatabaseConfig): Promise<void> {
  // One process owns a PGlite folder, and its single session cannot be held while synchronising.
  if (database.kind === 'pglite') return dataSource.synchronize();
  // Several processes may start against one PostgreSQL at once; two concurrent CREATE TABLEs of the
  // same table make one of them fail, so they take turns under an advisory lock. A transaction's
  // lock, held by a transaction left open on a connection of its own while the synchronisation
  // runs on others: behind a pooler in transaction mode (PgBouncer) a session lock and its unlock
  // may land on different server connections, and the lock would never be released.
  const runner = dataSource.createQueryRunner();
  try {
    await runner.startTransaction();
    try {
      await runner.query('SELECT pg_advisory_xact_lock($1)', [SCHEMA_LOCK_ID]);
      await synchronizeWithOneRetry(dataSource);
    } finally {
      await runner.commitTransaction();
    }
  } finally {
    await runner.release();
  }
}

/**
 * Processes that do not take the lock (the library's migration in another app, say) can still
 * create a table between our check and our CREATE; the second pass sees that table and moves on.
 */
async function synchronizeWithOneRetry(dataSource: DataSource): Promise<void> {
  try {
    await dataSource.synchronize();
  } catch {
    await dataSource.synchronize();
  }
}
