import type { DataSource, EntityManager } from 'typeorm';
import type {
  ClaimRequest,
  ClaimResult,
  Lease,
  LeaseState,
  StoredResponse,
} from '../idempotency-store.interface.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';

/** The statements whose best form differs between databases. */
export interface StoreDialect {
  claim(request: ClaimRequest): Promise<ClaimResult>;
  /**
   * Stores the response if the lease is still held. With a `changeTag` (PostgreSQL, a watched
   * lease), the same statement also notifies the record's waiters under that tag.
   */
  complete(
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
    changeTag: string | null,
  ): Promise<boolean>;
  /** As `complete`, as a statement of the transaction that `manager` holds. */
  completeWithin(
    manager: EntityManager,
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
    changeTag: string | null,
  ): Promise<boolean>;
  /** Deletes the record if the lease is still held; notifies as `complete` does. */
  release(lease: Lease, changeTag: string | null): Promise<boolean>;
  /** Extends the lock of a held lease. */
  renew(lease: Lease, lockedUntil: number): Promise<boolean>;
  /** Where the lease stands (see `IdempotencyStore.leaseState`). */
  leaseState(lease: Lease): Promise<LeaseState>;
  purgeExpired(now: number, limit: number): Promise<number>;
}

/**
 * Stores the response, if the lease is still held: a QueryBuilder update (MySQL/MariaDB, SQLite),
 * on the pool (a DataSource) or in a transaction (its EntityManager). `sql`: the store's database's
 * functions, decided when the store was built (`on` may be a DataSource of another TypeORM copy).
 */
export async function completeUnderLease(
  on: DataSource | EntityManager,
  lease: Lease,
  response: StoredResponse,
  expiresAt: number,
  { least }: SqlFunctions,
): Promise<boolean> {
  // A row the purge deferred while it ran (to its lock's end) is purged at its TTL, not at that
  // lock's end; any other row keeps its purge_at.
  const result = await on
    .createQueryBuilder()
    .update(IdempotencyRecord)
    .set({
      state: 'completed',
      expiresAt,
      purgeAt: () => `${least}(purge_at, :purgeBound)`,
      responseStatus: response.status,
      responseHeaders: JSON.stringify(response.headers),
      responseBody: response.body,
      responseBodyEncoding: response.bodyEncoding,
      responseIsError: response.isError,
    })
    .where(leaseCondition, { ...leaseParameters(lease), purgeBound: expiresAt })
    .execute();
  return result.affected === 1;
}

/** The names of the two-argument LEAST and GREATEST in one database's SQL. */
export interface SqlFunctions {
  readonly least: string;
  readonly greatest: string;
}

/** The DataSource's two-argument LEAST and GREATEST (SQLite's are MIN and MAX), once per store. */
export function sqlFunctions(dataSource: DataSource): SqlFunctions {
  return dataSource.driver.options.type === 'better-sqlite3'
    ? { least: 'MIN', greatest: 'MAX' }
    : { least: 'LEAST', greatest: 'GREATEST' };
}

/**
 * Extends the lock of a lease that is still held, never moving it back: a renewal that lands late
 * (stalled on its connection while later ones went through) must not shorten the lock they set.
 */
export async function renewUnderLease(
  dataSource: DataSource,
  lease: Lease,
  lockedUntil: number,
  { greatest }: SqlFunctions,
): Promise<boolean> {
  const result = await dataSource
    .createQueryBuilder()
    .update(IdempotencyRecord)
    .set({ expiresAt: () => `${greatest}(expires_at, :lockedUntil)` })
    .where(leaseCondition, { ...leaseParameters(lease), lockedUntil })
    .execute();
  return result.affected === 1;
}

/** Deletes the record, if the lease is still held. */
export async function releaseUnderLease(dataSource: DataSource, lease: Lease): Promise<boolean> {
  const result = await dataSource
    .createQueryBuilder()
    .delete()
    .from(IdempotencyRecord)
    .where(leaseCondition, leaseParameters(lease))
    .execute();
  return result.affected === 1;
}

/** Where the lease stands, from its record's state and token (`undefined`: no record). */
export function leaseStateOf(
  lease: Lease,
  record: { state: string; token: string } | undefined,
): LeaseState {
  if (!record) return 'absent';
  if (record.token !== lease.token) return 'taken';
  return record.state === 'completed' ? 'completed' : 'held';
}

const leaseCondition =
  'scope = :scope AND endpoint = :endpoint AND idempotency_key = :key AND lease_token = :token AND state = :inProgress';

function leaseParameters({ id, token }: Lease) {
  return { scope: id.scope, endpoint: id.endpoint, key: id.key, token, inProgress: 'in_progress' };
}

/** The escaped, schema-qualified table name of the entity in this DataSource. */
export function qualifiedTable(dataSource: DataSource, tablePath: string): string {
  return tablePath
    .split('.')
    .map((part) => dataSource.driver.escape(part))
    .join('.');
}

/** Runs a statement and returns how many rows it changed (needs a QueryRunner's structured result). */
export async function affectedRows(
  dataSource: DataSource,
  sql: string,
  parameters: unknown[],
): Promise<number> {
  const runner = dataSource.createQueryRunner();
  try {
    const { affected } = await runner.query(sql, parameters, true);
    return affected ?? 0;
  } finally {
    await runner.release();
  }
}
