import type { MigrationInterface, QueryRunner } from 'typeorm';
import { recordsTablePath } from './idempotency-record.entity.js';
import { qualifiedTable } from './store-dialect.js';

/** The record's id: the primary key, compared exactly. */
const ID_COLUMNS = ['scope', 'endpoint', 'idempotency_key'] as const;

/**
 * Binary collations that do not pad with spaces, in the order tried: MariaDB's (10.2 and later),
 * MySQL's (8.0 and later). Each is checked on the server before it is used.
 */
const NO_PAD_BINARY_COLLATIONS = ['utf8mb4_nopad_bin', 'utf8mb4_0900_bin'];

/** What `CreateIdempotencyRecords1763900000000` gave the id columns on MySQL/MariaDB. */
const PAD_SPACE_BINARY_COLLATION = 'utf8mb4_bin';

interface ColumnRow {
  COLUMN_NAME: string;
  DATA_TYPE: string;
  COLLATION_NAME: string | null;
  CHARACTER_MAXIMUM_LENGTH: number | string | null;
}

/**
 * MySQL/MariaDB: makes the id columns (scope, endpoint, idempotency_key) compare exactly. The
 * first migration gave them `utf8mb4_bin`, a PAD SPACE collation: `'k1 '` equals `'k1'` there, so
 * a key or a scope with trailing spaces read the record of the one without (another caller's, for
 * a scope). They get a NO PAD binary collation, picked by what the server has (`utf8mb4_nopad_bin`
 * on MariaDB, `utf8mb4_0900_bin` on MySQL 8); a server with neither (MySQL 5.7) is refused. A
 * `response_body` that is not `longtext` (a table TypeORM's synchronisation created) becomes one.
 *
 * Rows are kept (no two of them can differ only by trailing spaces or case: the old key refused
 * that). The `ALTER TABLE` rebuilds the table, blocking its writes meanwhile; later runs find the
 * columns right and do nothing. Nothing to do on PostgreSQL and SQLite, whose comparisons are
 * exact already.
 */
export class IdempotencyRecordsExactIds1767000000000 implements MigrationInterface {
  name = 'IdempotencyRecordsExactIds1767000000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    if (!isMysql(queryRunner)) return;
    await setIdCollation(queryRunner, await noPadBinaryCollation(queryRunner));
  }

  /** Back to `utf8mb4_bin`; fails if rows now differ only by trailing spaces. */
  async down(queryRunner: QueryRunner): Promise<void> {
    if (!isMysql(queryRunner)) return;
    await setIdCollation(queryRunner, PAD_SPACE_BINARY_COLLATION);
  }
}

function isMysql(queryRunner: QueryRunner): boolean {
  const type = queryRunner.connection.driver.options.type;
  return type === 'mysql' || type === 'mariadb';
}

/** The first collation of NO_PAD_BINARY_COLLATIONS the server has, checked to be exact. */
async function noPadBinaryCollation(queryRunner: QueryRunner): Promise<string> {
  const known = new Set(
    (
      (await queryRunner.query(
        `SELECT COLLATION_NAME AS name FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN (${NO_PAD_BINARY_COLLATIONS.map(() => '?').join(', ')})`,
        NO_PAD_BINARY_COLLATIONS,
      )) as { name: string }[]
    ).map((row) => row.name),
  );
  for (const collation of NO_PAD_BINARY_COLLATIONS.filter((name) => known.has(name))) {
    const [row] = (await queryRunner.query(
      `SELECT _utf8mb4'k' COLLATE ${collation} = _utf8mb4'k ' COLLATE ${collation} AS padded,
        _utf8mb4'k' COLLATE ${collation} = _utf8mb4'K' COLLATE ${collation} AS folded`,
    )) as { padded: number | string; folded: number | string }[];
    if (Number(row.padded) === 0 && Number(row.folded) === 0) return collation;
  }
  throw new Error(
    'nestjs-idempotency: this MySQL server has no binary collation that keeps trailing spaces significant (utf8mb4_nopad_bin on MariaDB 10.2+, utf8mb4_0900_bin on MySQL 8.0+), so keys and scopes that differ only by trailing spaces would share a record. Use MySQL 8.0 or later, or MariaDB 10.2 or later.',
  );
}

/** Gives the id columns `collation` (and `response_body` the type `longtext`) where they differ. */
async function setIdCollation(queryRunner: QueryRunner, collation: string): Promise<void> {
  const dataSource = queryRunner.connection;
  const tablePath = recordsTablePath(dataSource);
  const { database, tableName } = dataSource.driver.parseTableName(tablePath);
  const columns = (await queryRunner.query(
    `SELECT COLUMN_NAME, DATA_TYPE, COLLATION_NAME, CHARACTER_MAXIMUM_LENGTH FROM information_schema.COLUMNS
      WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?`,
    [database ?? null, tableName],
  )) as ColumnRow[];
  const changes: string[] = [];
  for (const name of ID_COLUMNS) {
    const column = columns.find((candidate) => candidate.COLUMN_NAME === name);
    if (!column || column.COLLATION_NAME === collation) continue;
    const length = Number(column.CHARACTER_MAXIMUM_LENGTH ?? 255);
    changes.push(
      `MODIFY ${name} varchar(${length}) CHARACTER SET utf8mb4 COLLATE ${collation} NOT NULL`,
    );
  }
  const body = columns.find((candidate) => candidate.COLUMN_NAME === 'response_body');
  if (body && body.DATA_TYPE !== 'longtext') changes.push('MODIFY response_body longtext NULL');
  if (changes.length === 0) return;
  await queryRunner.query(
    `ALTER TABLE ${qualifiedTable(dataSource, tablePath)} ${changes.join(', ')}`,
  );
}
