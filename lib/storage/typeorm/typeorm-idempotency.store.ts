import type { DataSource } from 'typeorm';
import type {
  ClaimRequest,
  ClaimResult,
  IdempotencyStore,
  Lease,
  StoredResponse,
} from '../idempotency-store.interface.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';
import { PortableDialect } from './portable.dialect.js';
import { PostgresDialect } from './postgres.dialect.js';
import { qualifiedTable, type StoreDialect } from './store-dialect.js';

/** Databases the TypeORM store runs on, by TypeORM driver type. */
const SUPPORTED = ['postgres', 'mysql', 'mariadb', 'better-sqlite3'] as const;

/**
 * Records in a TypeORM `DataSource`: PostgreSQL (and PGlite through `typeorm-pglite`) with a
 * one-statement claim, MySQL/MariaDB and SQLite (better-sqlite3) with a portable one. Completion
 * and release are QueryBuilder updates conditional on the lease token, the same everywhere.
 */
export class TypeOrmIdempotencyStore implements IdempotencyStore {
  private readonly dialect: StoreDialect;

  constructor(private readonly dataSource: DataSource) {
    if (!dataSource.hasMetadata(IdempotencyRecord)) {
      throw new Error(
        'nestjs-idempotency: IdempotencyRecord is not an entity of the DataSource given to IdempotencyModule. ' +
          "Add it to the DataSource's `entities` (or use `autoLoadEntities` with TypeOrmModule.forFeature([IdempotencyRecord])).",
      );
    }
    const type = dataSource.driver.options.type;
    if (!(SUPPORTED as readonly string[]).includes(type)) {
      throw new Error(
        `nestjs-idempotency: the TypeORM store supports ${SUPPORTED.join(', ')}; this DataSource is '${type}'.`,
      );
    }
    const table = qualifiedTable(dataSource, dataSource.getMetadata(IdempotencyRecord).tablePath);
    this.dialect =
      type === 'postgres'
        ? new PostgresDialect(dataSource, table)
        : new PortableDialect(dataSource, table);
  }

  claim(request: ClaimRequest): Promise<ClaimResult> {
    return this.dialect.claim(request);
  }

  async complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
    const result = await this.dataSource
      .createQueryBuilder()
      .update(IdempotencyRecord)
      .set({
        state: 'completed',
        expiresAt,
        responseStatus: response.status,
        responseHeaders: JSON.stringify(response.headers),
        responseBody: response.body,
        responseBodyEncoding: response.bodyEncoding,
        responseIsError: response.isError,
      })
      .where(leaseCondition, leaseParameters(lease))
      .execute();
    return result.affected === 1;
  }

  async release(lease: Lease): Promise<boolean> {
    const result = await this.dataSource
      .createQueryBuilder()
      .delete()
      .from(IdempotencyRecord)
      .where(leaseCondition, leaseParameters(lease))
      .execute();
    return result.affected === 1;
  }

  purgeExpired(now: number, limit: number): Promise<number> {
    return this.dialect.purgeExpired(now, limit);
  }
}

const leaseCondition =
  'scope = :scope AND endpoint = :endpoint AND idempotency_key = :key AND lease_token = :token AND state = :inProgress';

function leaseParameters({ id, token }: Lease) {
  return { scope: id.scope, endpoint: id.endpoint, key: id.key, token, inProgress: 'in_progress' };
}
