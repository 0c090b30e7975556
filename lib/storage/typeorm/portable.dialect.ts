import type { DataSource, EntityManager } from 'typeorm';
import type {
  ClaimRequest,
  ClaimResult,
  Lease,
  LeaseState,
  RecordId,
  RecordSnapshot,
  StoredResponse,
} from '../idempotency-store.interface.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';
import {
  affectedRows,
  completeUnderLease,
  leaseStateOf,
  releaseUnderLease,
  renewUnderLease,
  type StoreDialect,
} from './store-dialect.js';

const CLAIM_ATTEMPTS = 5;

/**
 * MySQL/MariaDB and SQLite, through QueryBuilder: the claim is an insert that the primary key
 * ignores when the key exists (`INSERT IGNORE` / `INSERT OR IGNORE`), then a read of the row — ours
 * if it carries our lease token. A dead row is taken over by an update conditional on the lease
 * token that was read, which only one concurrent request can match. A first request costs three
 * round trips (insert, read, complete), a replay two. No notifications here: waiters poll.
 */
export class PortableDialect implements StoreDialect {
  private readonly purgeSql: string;

  constructor(
    private readonly dataSource: DataSource,
    table: string,
  ) {
    const type = dataSource.driver.options.type;
    this.purgeSql =
      type === 'mysql' || type === 'mariadb'
        ? `DELETE FROM ${table} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?`
        : `DELETE FROM ${table} WHERE rowid IN (SELECT rowid FROM ${table} WHERE expires_at <= ? LIMIT ?)`;
  }

  complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
    return completeUnderLease(this.dataSource, lease, response, expiresAt);
  }

  completeWithin(
    manager: EntityManager,
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
  ): Promise<boolean> {
    return completeUnderLease(manager, lease, response, expiresAt);
  }

  release(lease: Lease): Promise<boolean> {
    return releaseUnderLease(this.dataSource, lease);
  }

  renew(lease: Lease, lockedUntil: number): Promise<boolean> {
    return renewUnderLease(this.dataSource, lease, lockedUntil);
  }

  async leaseState(lease: Lease): Promise<LeaseState> {
    const row = await this.readRow(lease.id);
    return leaseStateOf(lease, row ? { state: row.state, token: row.leaseToken } : undefined);
  }

  async claim(request: ClaimRequest): Promise<ClaimResult> {
    const { id, fingerprint, token, now, lockedUntil } = request;
    const lease = { id, token };
    for (let attempt = 1; attempt <= CLAIM_ATTEMPTS; attempt++) {
      await this.dataSource
        .createQueryBuilder()
        .insert()
        .into(IdempotencyRecord)
        .values({
          ...id,
          fingerprint,
          state: 'in_progress',
          leaseToken: token,
          expiresAt: lockedUntil,
          createdAt: now,
          responseIsError: false,
        })
        .orIgnore()
        .execute();
      const row = await this.readRow(id);
      if (!row) continue; // released between the insert and the read
      if (row.leaseToken === token) return { claimed: true, lease, takeover: false };
      const dead =
        row.expiresAt <= now && (row.state === 'completed' || row.fingerprint === fingerprint);
      if (!dead) return { claimed: false, record: toSnapshot(row) };
      const takeover = await this.dataSource
        .createQueryBuilder()
        .update(IdempotencyRecord)
        .set({
          fingerprint,
          state: 'in_progress',
          leaseToken: token,
          expiresAt: lockedUntil,
          createdAt: now,
          responseStatus: null,
          responseHeaders: null,
          responseBody: null,
          responseBodyEncoding: null,
          responseIsError: false,
        })
        .where(
          'scope = :scope AND endpoint = :endpoint AND idempotency_key = :key AND lease_token = :seen AND expires_at <= :now',
          { ...id, seen: row.leaseToken, now },
        )
        .execute();
      if (takeover.affected === 1) return { claimed: true, lease, takeover: true };
    }
    throw new Error('nestjs-idempotency: the claim kept racing with concurrent writers');
  }

  /**
   * The row of `id`, read on the primary (with TypeORM's `replication`, reads go to a replica by
   * default, which may not have the insert just made) and never from TypeORM's query cache
   * (`cache: { alwaysEnabled: true }`): a replica's or a cached row is another claim's, and this
   * claim would answer with a record that is no longer there.
   */
  private async readRow(id: RecordId): Promise<IdempotencyRecord | null> {
    const runner = this.dataSource.createQueryRunner('master');
    try {
      return await runner.manager.getRepository(IdempotencyRecord).findOne({
        where: { scope: id.scope, endpoint: id.endpoint, key: id.key },
        cache: false,
      });
    } finally {
      await runner.release();
    }
  }

  purgeExpired(now: number, limit: number): Promise<number> {
    return affectedRows(this.dataSource, this.purgeSql, [now, limit]);
  }
}

function toSnapshot(row: IdempotencyRecord): RecordSnapshot {
  return {
    state: row.state,
    fingerprint: row.fingerprint,
    token: row.leaseToken,
    expiresAt: row.expiresAt,
    response:
      row.state === 'completed' && row.responseStatus !== null
        ? {
            status: row.responseStatus,
            headers: row.responseHeaders ? JSON.parse(row.responseHeaders) : {},
            body: row.responseBody,
            bodyEncoding: row.responseBodyEncoding ?? 'json',
            isError: Boolean(row.responseIsError),
          }
        : null,
  };
}
