import { Logger } from '@nestjs/common';
import { DataSource, InstanceChecker, type DataSourceOptions } from 'typeorm';
import { CreateIdempotencyRecords1763900000000 } from './create-idempotency-records.migration.js';
import { IdempotencyRecordsExactIds1767000000000 } from './idempotency-records-exact-ids.migration.js';
import { IdempotencyRecordsHotCompletion1768000000000 } from './idempotency-records-hot-completion.migration.js';
import { IdempotencyRecord, recordsTablePath } from './idempotency-record.entity.js';
import { pgliteDriver } from './pglite-driver.js';
import { qualifiedTable } from './store-dialect.js';

/** The connection the store uses, and whether the module opened it (and so must close it). */
export interface IdempotencyConnection {
  readonly dataSource: DataSource;
  readonly owned: boolean;
}

/**
 * Opens what the options name: the app's DataSource as it is (initialised if it was not yet),
 * DataSourceOptions as a connection of the module's own with the entity added, or by default an
 * in-memory PGlite database.
 */
export async function openIdempotencyConnection(
  given: DataSource | DataSourceOptions | undefined,
): Promise<IdempotencyConnection> {
  // TypeORM's own check, not `instanceof`: the app's DataSource may come from another copy of
  // TypeORM than the library's (npm link, a workspace, pnpm resolving the peer twice).
  if (InstanceChecker.isDataSource(given)) {
    if (!given.isInitialized) await given.initialize();
    return { dataSource: given, owned: false };
  }
  const options: DataSourceOptions = given ?? {
    type: 'postgres',
    driver: pgliteDriver(),
  };
  const dataSource = new DataSource({
    ...options,
    entities: [...((options.entities as unknown[] | undefined) ?? []), IdempotencyRecord],
  } as DataSourceOptions);
  await dataSource.initialize();
  return { dataSource, owned: true };
}

/**
 * Runs the table migrations. Several processes may start at once: if one loses the race to create
 * the table, the table exists and that is all that matters. The upgrades after it are safe to run
 * at once (each finds what it changes already changed, or waits for the other's ALTER).
 */
export async function ensureIdempotencyTable(dataSource: DataSource): Promise<void> {
  const runner = dataSource.createQueryRunner();
  try {
    try {
      await new CreateIdempotencyRecords1763900000000().up(runner);
    } catch (error) {
      if (!(await runner.hasTable(recordsTablePath(dataSource)))) throw error;
      new Logger('Idempotency').debug(`Table created concurrently: ${(error as Error).message}`);
    }
    await new IdempotencyRecordsExactIds1767000000000().up(runner);
    await new IdempotencyRecordsHotCompletion1768000000000().up(runner);
  } finally {
    await runner.release();
  }
}

/** The table's migrations, in the order they run: what an app that runs them itself must list. */
const MIGRATION_NAMES = [
  CreateIdempotencyRecords1763900000000,
  IdempotencyRecordsExactIds1767000000000,
  IdempotencyRecordsHotCompletion1768000000000,
].map((migration) => migration.name);

/**
 * With `runMigrations: false`: what of the table the store needs is missing, as a warning to log at
 * startup, or `undefined` when the store's own statements can read the table and the column of the
 * latest migration. Read as the store reads it (the same name, so through the search path on
 * PostgreSQL), and the database's own message is quoted: a table the app's role may not read reads
 * as missing. A warning, not an error: an app may run its migrations after the module has started
 * (`app.get(DataSource).runMigrations()` before `listen`).
 */
export async function missingTableWarning(dataSource: DataSource): Promise<string | undefined> {
  const tablePath = recordsTablePath(dataSource);
  const table = qualifiedTable(dataSource, tablePath);
  const failure = async (sql: string) => {
    try {
      await dataSource.query(sql);
      return undefined;
    } catch (error) {
      return (error as Error)?.message ?? String(error);
    }
  };
  const withoutColumn = await failure(`SELECT purge_at FROM ${table} WHERE 1 = 0`);
  if (withoutColumn === undefined) return undefined;
  const withoutTable = await failure(`SELECT 1 FROM ${table} WHERE 1 = 0`);
  const missing =
    withoutTable === undefined
      ? `the table ${tablePath} has no column purge_at (added by ${MIGRATION_NAMES[2]}; the database said: ${withoutColumn})`
      : `the table ${tablePath} cannot be read (the database said: ${withoutTable})`;
  return (
    `With runMigrations: false, ${missing}. Until the app has run the migrations ${MIGRATION_NAMES.join(', ')} (in this order), ` +
    "every call with an idempotency key is refused as store-unavailable (503 on HTTP). List them among the DataSource's migrations, or leave runMigrations on."
  );
}
