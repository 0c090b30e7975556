import { Table, TableIndex, type MigrationInterface, type QueryRunner } from 'typeorm';
import { recordsTablePath } from './idempotency-record.entity.js';

/**
 * The name of an index of the records table on `column`: its own per table name (index names are
 * unique per schema in PostgreSQL, per database in SQLite): `idx_idempotency_records_<column>` for
 * the default table.
 */
export function recordsIndexName(tablePath: string, column: string): string {
  return `idx_${tablePath.split('.').pop()!}_${column}`;
}

/** The first migration's purge index (on `expires_at`), dropped by the HOT-completion migration. */
export function expiresAtIndexName(tablePath: string): string {
  return recordsIndexName(tablePath, 'expires_at');
}

/**
 * Creates the `idempotency_records` table (under the name the DataSource gives the entity: with its
 * `entityPrefix`, in its `schema`) and its purge index. Safe to run more than once and from
 * several processes at once (every step is "if not exists"), so the module can run it on each
 * startup and you can also list it among your own TypeORM migrations.
 */
export class CreateIdempotencyRecords1763900000000 implements MigrationInterface {
  name = 'CreateIdempotencyRecords1763900000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    const tablePath = recordsTablePath(queryRunner.connection);
    const indexName = expiresAtIndexName(tablePath);
    // MySQL's TEXT holds 64 KiB; a stored response may be larger (maxResponseBytes, 1 MiB).
    const driverType = queryRunner.connection.driver.options.type;
    const isMysql = driverType === 'mysql' || driverType === 'mariadb';
    const bodyType = isMysql ? 'longtext' : 'text';
    // Keys are case-sensitive; MySQL's default collations compare case-insensitively.
    const exact = isMysql ? { collation: 'utf8mb4_bin' } : {};
    await queryRunner.createTable(
      new Table({
        name: tablePath,
        columns: [
          { name: 'scope', type: 'varchar', length: '255', isPrimary: true, ...exact },
          { name: 'endpoint', type: 'varchar', length: '255', isPrimary: true, ...exact },
          { name: 'idempotency_key', type: 'varchar', length: '255', isPrimary: true, ...exact },
          { name: 'fingerprint', type: 'varchar', length: '64' },
          { name: 'state', type: 'varchar', length: '16' },
          { name: 'lease_token', type: 'varchar', length: '36' },
          { name: 'expires_at', type: 'bigint' },
          { name: 'created_at', type: 'bigint' },
          { name: 'response_status', type: 'int', isNullable: true },
          { name: 'response_headers', type: 'text', isNullable: true },
          { name: 'response_body', type: bodyType, isNullable: true },
          { name: 'response_body_encoding', type: 'varchar', length: '8', isNullable: true },
          { name: 'response_is_error', type: 'boolean', default: false },
        ],
      }),
      true,
    );
    const table = await queryRunner.getTable(tablePath);
    if (!table?.indices.some((index) => index.name === indexName)) {
      await queryRunner.createIndex(
        tablePath,
        new TableIndex({ name: indexName, columnNames: ['expires_at'] }),
      );
    }
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.dropTable(recordsTablePath(queryRunner.connection), true);
  }
}
