import type { DataSource } from 'typeorm';
import type { ClaimRequest, ClaimResult, RecordSnapshot } from '../idempotency-store.interface.js';
import { affectedRows, type StoreDialect } from './store-dialect.js';

/** Raw row of the claim statement: the table's columns plus whether this call claimed it. */
interface ClaimRow {
  claimed: boolean;
  /** xmax is 0 on a row version this statement inserted, not on one it updated. */
  inserted: boolean;
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
 * The reading half of the claim cannot see a row that a concurrent transaction committed after the
 * statement began, so a claim that loses that race reads nothing; the next attempt sees it.
 */
const CLAIM_ATTEMPTS = 5;

/**
 * PostgreSQL and PGlite: a claim is one statement — an insert that, on conflict, takes the row
 * over only when it is dead, and otherwise returns the row as it stands. A first request costs two
 * round trips (claim, complete), a replay one.
 */
export class PostgresDialect implements StoreDialect {
  private readonly claimSql: string;
  private readonly purgeSql: string;

  constructor(
    private readonly dataSource: DataSource,
    table: string,
  ) {
    this.claimSql = buildClaimSql(table);
    // ctid batches: at most `limit` rows by physical address, skipping rows a concurrent claim
    // holds, re-checking expiry on what it deletes.
    this.purgeSql = `DELETE FROM ${table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM ${table} WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED
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
        ? { claimed: true, lease: { id, token }, takeover: !row.inserted }
        : { claimed: false, record: toSnapshot(row) };
    }
    throw new Error('nestjs-idempotency: the claim kept racing with concurrent writers');
  }

  purgeExpired(now: number, limit: number): Promise<number> {
    return affectedRows(this.dataSource, this.purgeSql, [now, limit]);
  }
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
    RETURNING r.*, (r.xmax = 0) AS inserted
  )
  SELECT true AS claimed, c.* FROM claimed c
  UNION ALL
  SELECT false AS claimed, r.*, false AS inserted FROM ${table} r
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
