import type { DataSource, EntityMetadata } from 'typeorm';
import type {
  ClaimRequest,
  ClaimResult,
  IdempotencyStore,
  Lease,
  RecordSnapshot,
  StoredResponse,
} from '../idempotency-store.interface.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';

/** Raw row of the claim statement: the table's columns plus whether this call claimed it. */
interface ClaimRow {
  claimed: boolean;
  fingerprint: string;
  state: RecordSnapshot['state'];
  lease_token: string;
  expires_at: string | number;
  response_status: number | null;
  response_headers: string | null;
  response_body: string | null;
  response_body_encoding: 'json' | 'base64' | null;
  response_is_error: boolean;
}

/**
 * The reading statement of a claim cannot see a row that a concurrent transaction committed after
 * the statement began, so a claim that loses that race reads nothing; the next attempt sees it.
 */
const CLAIM_ATTEMPTS = 5;

/**
 * Records in a TypeORM `DataSource` (PostgreSQL, and PGlite through `typeorm-pglite`).
 *
 * A claim is one statement: an insert that, on conflict, takes the row over only when it is dead
 * (expired, and for an in-progress row only with the same fingerprint), and otherwise returns the
 * row as it stands. So a first request costs two round trips (claim, complete) and a replay one.
 */
export class TypeOrmIdempotencyStore implements IdempotencyStore {
  private readonly table: string;
  private readonly claimSql: string;
  private readonly purgeSql: string;

  constructor(private readonly dataSource: DataSource) {
    const metadata = findRecordMetadata(dataSource);
    if (dataSource.driver.options.type !== 'postgres') {
      throw new Error(
        `nestjs-idempotency: the TypeORM store supports PostgreSQL and PGlite; this DataSource is '${dataSource.driver.options.type}'.`,
      );
    }
    this.table = metadata.tablePath
      .split('.')
      .map((part) => dataSource.driver.escape(part))
      .join('.');
    this.claimSql = buildClaimSql(this.table);
    this.purgeSql = `DELETE FROM ${this.table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM ${this.table} WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED
      )) AND expires_at <= $1`;
  }

  async claim(request: ClaimRequest): Promise<ClaimResult> {
    const { id, fingerprint, token, now, lockedUntil } = request;
    const params = [id.scope, id.endpoint, id.key, fingerprint, token, lockedUntil, now];
    for (let attempt = 1; attempt <= CLAIM_ATTEMPTS; attempt++) {
      const rows: ClaimRow[] = await this.dataSource.query(this.claimSql, params);
      if (rows.length === 0) continue;
      const row = rows[0];
      return row.claimed
        ? { claimed: true, lease: { id, token } }
        : { claimed: false, record: toSnapshot(row) };
    }
    throw new Error('nestjs-idempotency: the claim kept racing with concurrent writers');
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

  async purgeExpired(now: number, limit: number): Promise<number> {
    // ctid batches: each statement deletes at most `limit` rows by physical address, skipping rows
    // that a concurrent claim holds, and re-checks expiry on what it deletes.
    const runner = this.dataSource.createQueryRunner();
    try {
      const { affected } = await runner.query(this.purgeSql, [now, limit], true);
      return affected ?? 0;
    } finally {
      await runner.release();
    }
  }
}

const leaseCondition =
  'scope = :scope AND endpoint = :endpoint AND idempotency_key = :key AND lease_token = :token AND state = :inProgress';

function leaseParameters({ id, token }: Lease) {
  return { scope: id.scope, endpoint: id.endpoint, key: id.key, token, inProgress: 'in_progress' };
}

function findRecordMetadata(dataSource: DataSource): EntityMetadata {
  if (!dataSource.hasMetadata(IdempotencyRecord)) {
    throw new Error(
      'nestjs-idempotency: IdempotencyRecord is not an entity of the DataSource given to IdempotencyModule. ' +
        "Add it to the DataSource's `entities` (or use `autoLoadEntities` with TypeOrmModule.forFeature([IdempotencyRecord])).",
    );
  }
  return dataSource.getMetadata(IdempotencyRecord);
}

/**
 * $1 scope, $2 endpoint, $3 key, $4 fingerprint, $5 lease token, $6 locked until, $7 now.
 * The takeover condition: the row's time is up, and it either completed (an expired key counts as
 * new, whatever its payload) or is an abandoned in-progress claim of the same payload (a different
 * payload under an abandoned key is still a 422: the key stays bound to its first payload).
 */
function buildClaimSql(table: string): string {
  return `WITH claimed AS (
    INSERT INTO ${table} AS r (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
      expires_at, created_at, response_is_error)
    VALUES ($1, $2, $3, $4, 'in_progress', $5, $6, $7, false)
    ON CONFLICT (scope, endpoint, idempotency_key) DO UPDATE SET
      fingerprint = EXCLUDED.fingerprint, state = 'in_progress', lease_token = EXCLUDED.lease_token,
      expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at, response_status = NULL,
      response_headers = NULL, response_body = NULL, response_body_encoding = NULL,
      response_is_error = false
    WHERE r.expires_at <= $7 AND (r.state = 'completed' OR r.fingerprint = EXCLUDED.fingerprint)
    RETURNING r.*
  )
  SELECT true AS claimed, c.* FROM claimed c
  UNION ALL
  SELECT false AS claimed, r.* FROM ${table} r
  WHERE r.scope = $1 AND r.endpoint = $2 AND r.idempotency_key = $3
    AND NOT EXISTS (SELECT 1 FROM claimed)`;
}

function toSnapshot(row: ClaimRow): RecordSnapshot {
  return {
    state: row.state,
    fingerprint: row.fingerprint,
    expiresAt: Number(row.expires_at),
    response:
      row.state === 'completed' && row.response_status !== null
        ? {
            status: row.response_status,
            headers: row.response_headers ? JSON.parse(row.response_headers) : {},
            body: row.response_body,
            bodyEncoding: row.response_body_encoding ?? 'json',
            isError: row.response_is_error,
          }
        : null,
  };
}
