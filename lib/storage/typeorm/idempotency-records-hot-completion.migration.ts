import type { MigrationInterface, QueryRunner, Table } from 'typeorm';
import { expiresAtIndexName, recordsIndexName } from './create-idempotency-records.migration.js';
import { recordsTablePath } from './idempotency-record.entity.js';
import { qualifiedTable } from './store-dialect.js';

/**
 * The share of each PostgreSQL heap page that inserts fill (percent): the rest is left for the
 * completion's new row version, so that it stays on its page (a HOT update needs the room there).
 */
export const RECORDS_FILLFACTOR = 70;

/** The purge column. */
const PURGE_AT = 'purge_at';

/**
 * Makes the completion (and the lease renewal) of a record a HOT update on PostgreSQL and PGlite:
 * a new row version on the same heap page and no index entry at all, instead of an entry in every
 * index of the table. An update is HOT only when it changes no indexed column, and the completion
 * changes `expires_at`, which the purge index covered. So:
 *
 * - a column `purge_at` (bigint, default 0), set by the claim (see `ClaimRequest.ttlMs`), left
 *   alone by the renewal and only lowered by the completion (for a record the purge deferred while
 *   it ran): from when on the purge looks at the record (`IdempotencyStore.purgeExpired`
 *   still deletes a record only once `expires_at` has passed, and moves `purge_at` of one found too
 *   early up to its `expires_at`);
 * - the purge index on `purge_at` instead of `expires_at`;
 * - PostgreSQL: `fillfactor` 70 (`RECORDS_FILLFACTOR`) on the table, so a page keeps room for the
 *   completed version of the rows inserted into it.
 *
 * On MySQL/MariaDB and SQLite the same column and index: no HOT there, but the completion no longer
 * changes a secondary index either. Rows of 0.1 get `purge_at` 0: the next purge looks at each once
 * and moves it to its `expires_at` (an upgrade rewrites no row; an app of 0.1 still running beside
 * the new one inserts rows that way too). Safe to run more than once and from several processes
 * at once; `down` restores the table of 0.1.
 */
export class IdempotencyRecordsHotCompletion1768000000000 implements MigrationInterface {
  name = 'IdempotencyRecordsHotCompletion1768000000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    const tablePath = recordsTablePath(queryRunner.connection);
    const table = qualifiedTable(queryRunner.connection, tablePath);
    const purgeIndex = recordsIndexName(tablePath, PURGE_AT);
    const expiresIndex = expiresAtIndexName(tablePath);
    const kind = dialectOf(queryRunner);
    if (kind === 'postgres') {
      await upgradePostgres(queryRunner, tablePath, purgeIndex, expiresIndex);
      return;
    }
    await changeOnce(queryRunner, tablePath, isUpgraded(purgeIndex, expiresIndex), async () => {
      if (kind === 'mysql') {
        const current = await queryRunner.getTable(tablePath);
        const steps = [
          hasColumn(current, PURGE_AT) ? null : `ADD COLUMN ${PURGE_AT} bigint NOT NULL DEFAULT 0`,
          hasIndex(current, purgeIndex) ? null : `ADD INDEX ${purgeIndex} (${PURGE_AT})`,
          hasIndex(current, expiresIndex) ? `DROP INDEX ${expiresIndex}` : null,
        ].filter((step) => step !== null);
        if (steps.length > 0) await queryRunner.query(`ALTER TABLE ${table} ${steps.join(', ')}`);
        return;
      }
      const current = await queryRunner.getTable(tablePath);
      if (!hasColumn(current, PURGE_AT)) {
        await queryRunner.query(
          `ALTER TABLE ${table} ADD COLUMN ${PURGE_AT} bigint NOT NULL DEFAULT 0`,
        );
      }
      await queryRunner.query(
        `CREATE INDEX IF NOT EXISTS "${purgeIndex}" ON ${table} (${PURGE_AT})`,
      );
      await queryRunner.query(`DROP INDEX IF EXISTS "${expiresIndex}"`);
    });
  }

  /** Back to the table of 0.1: the `expires_at` index, no `purge_at`, the default fillfactor. */
  async down(queryRunner: QueryRunner): Promise<void> {
    const tablePath = recordsTablePath(queryRunner.connection);
    const table = qualifiedTable(queryRunner.connection, tablePath);
    const purgeIndex = recordsIndexName(tablePath, PURGE_AT);
    const expiresIndex = expiresAtIndexName(tablePath);
    const kind = dialectOf(queryRunner);
    if (kind === 'postgres') {
      const schema = schemaPrefix(queryRunner, tablePath);
      await queryRunner.query(
        `CREATE INDEX IF NOT EXISTS "${expiresIndex}" ON ${table} (expires_at)`,
      );
      await queryRunner.query(`DROP INDEX IF EXISTS ${schema}"${purgeIndex}"`);
      await queryRunner.query(`ALTER TABLE ${table} DROP COLUMN IF EXISTS ${PURGE_AT}`);
      await queryRunner.query(`ALTER TABLE ${table} RESET (fillfactor)`);
      return;
    }
    const current = await queryRunner.getTable(tablePath);
    if (kind === 'mysql') {
      const steps = [
        hasIndex(current, expiresIndex) ? null : `ADD INDEX ${expiresIndex} (expires_at)`,
        hasIndex(current, purgeIndex) ? `DROP INDEX ${purgeIndex}` : null,
        hasColumn(current, PURGE_AT) ? `DROP COLUMN ${PURGE_AT}` : null,
      ].filter((step) => step !== null);
      if (steps.length > 0) await queryRunner.query(`ALTER TABLE ${table} ${steps.join(', ')}`);
      return;
    }
    await queryRunner.query(
      `CREATE INDEX IF NOT EXISTS "${expiresIndex}" ON ${table} (expires_at)`,
    );
    await queryRunner.query(`DROP INDEX IF EXISTS "${purgeIndex}"`);
    if (hasColumn(current, PURGE_AT))
      await queryRunner.query(`ALTER TABLE ${table} DROP COLUMN ${PURGE_AT}`);
    await queryRunner.getTable(tablePath);
  }
}

type Dialect = 'postgres' | 'mysql' | 'sqlite';

interface PostgresShape {
  has_column: boolean;
  has_purge_index: boolean;
  has_expires_index: boolean;
  has_fillfactor: boolean;
}

/**
 * PostgreSQL and PGlite: only the steps still to do, read from the catalog first. `ALTER TABLE …
 * ADD COLUMN IF NOT EXISTS` takes the table's strongest lock even when the column exists: on every
 * startup it would queue every request behind the longest running transaction on the table.
 */
async function upgradePostgres(
  queryRunner: QueryRunner,
  tablePath: string,
  purgeIndex: string,
  expiresIndex: string,
): Promise<void> {
  const table = qualifiedTable(queryRunner.connection, tablePath);
  const schema = schemaPrefix(queryRunner, tablePath);
  const shape = async () =>
    (
      (await queryRunner.query(
        `SELECT
          EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = '${PURGE_AT}' AND NOT attisdropped) AS has_column,
          to_regclass($2) IS NOT NULL AS has_purge_index,
          to_regclass($3) IS NOT NULL AS has_expires_index,
          COALESCE((SELECT 'fillfactor=${RECORDS_FILLFACTOR}' = ANY(reloptions) FROM pg_class WHERE oid = to_regclass($1)), false) AS has_fillfactor`,
        [table, `${schema}"${purgeIndex}"`, `${schema}"${expiresIndex}"`],
      )) as PostgresShape[]
    )[0];
  const done = (now: PostgresShape) =>
    now.has_column && now.has_purge_index && !now.has_expires_index && now.has_fillfactor;
  // Another process upgrading at once may win a step (CREATE INDEX IF NOT EXISTS can still collide
  // on the catalog): read the shape again and do what is left.
  for (let attempt = 1; ; attempt++) {
    const before = await shape();
    if (done(before)) return;
    try {
      await upgradeSteps(queryRunner, before, table, schema, purgeIndex, expiresIndex);
      return;
    } catch (error) {
      if (attempt >= 3) throw error;
    }
  }
}

/** The steps `before` says are still to do, in order. */
async function upgradeSteps(
  queryRunner: QueryRunner,
  before: PostgresShape,
  table: string,
  schema: string,
  purgeIndex: string,
  expiresIndex: string,
): Promise<void> {
  if (!before.has_column) {
    await queryRunner.query(
      `ALTER TABLE ${table} ADD COLUMN IF NOT EXISTS ${PURGE_AT} bigint NOT NULL DEFAULT 0`,
    );
  }
  if (!before.has_purge_index) {
    await queryRunner.query(`CREATE INDEX IF NOT EXISTS "${purgeIndex}" ON ${table} (${PURGE_AT})`);
  }
  if (before.has_expires_index)
    await queryRunner.query(`DROP INDEX IF EXISTS ${schema}"${expiresIndex}"`);
  if (!before.has_fillfactor) {
    await queryRunner.query(`ALTER TABLE ${table} SET (fillfactor = ${RECORDS_FILLFACTOR})`);
  }
}

function dialectOf(queryRunner: QueryRunner): Dialect {
  const type = queryRunner.connection.driver.options.type;
  if (type === 'postgres') return 'postgres';
  if (type === 'mysql' || type === 'mariadb') return 'mysql';
  return 'sqlite';
}

/** PostgreSQL: an index is dropped by its schema-qualified name (`"schema".` or nothing). */
function schemaPrefix(queryRunner: QueryRunner, tablePath: string): string {
  const parts = tablePath.split('.');
  return parts.length > 1 ? `${queryRunner.connection.driver.escape(parts[0])}.` : '';
}

function hasColumn(table: Table | undefined, name: string): boolean {
  return table?.columns.some((column) => column.name === name) ?? false;
}

function hasIndex(table: Table | undefined, name: string): boolean {
  return table?.indices.some((index) => index.name === name) ?? false;
}

function isUpgraded(purgeIndex: string, expiresIndex: string) {
  return (table: Table | undefined) =>
    hasColumn(table, PURGE_AT) && hasIndex(table, purgeIndex) && !hasIndex(table, expiresIndex);
}

/**
 * Runs `change` unless the table is as it should be already. Another process running the same
 * upgrade at once may win the race (a duplicate column, a missing index): if the table then is as
 * it should be, that is all that matters.
 */
async function changeOnce(
  queryRunner: QueryRunner,
  tablePath: string,
  done: (table: Table | undefined) => boolean,
  change: () => Promise<void>,
): Promise<void> {
  if (done(await queryRunner.getTable(tablePath))) return;
  try {
    await change();
  } catch (error) {
    if (!done(await queryRunner.getTable(tablePath))) throw error;
  }
  // The runner's cached shape of the table (TypeORM's dropTable and others read it) is stale now.
  await queryRunner.getTable(tablePath);
}
