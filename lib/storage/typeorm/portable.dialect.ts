import type { DataSource, EntityManager } from 'typeorm';
import {
  purgeFrom,
  recordName,
  type ClaimRequest,
  type ClaimResult,
  type Lease,
  type LeaseState,
  type RecordId,
  type RecordSnapshot,
  type StoredResponse,
} from '../idempotency-store.interface.js';
import { StatementBatcher } from './statement-batcher.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';
import {
  affectedRows,
  completeUnderLease,
  leaseStateOf,
  releaseUnderLease,
  renewUnderLease,
  sqlFunctions,
  type SqlFunctions,
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
  /** Rows the purge looked at too early: their `purge_at` moves up to their `expires_at`. */
  private readonly deferSql: string;
  private readonly sql: SqlFunctions;
  /**
   * Renewals issued in one tick (one renewal timer renews every running lease at once): one
   * statement for all of them when each lease is still held, else each alone.
   */
  private readonly renewals: StatementBatcher<{ lease: Lease; lockedUntil: number }, boolean>;

  constructor(
    private readonly dataSource: DataSource,
    private readonly table: string,
  ) {
    const type = dataSource.driver.options.type;
    const mysql = type === 'mysql' || type === 'mariadb';
    this.purgeSql = mysql
      ? `DELETE FROM ${table} WHERE purge_at <= ? AND expires_at <= ? ORDER BY purge_at LIMIT ?`
      : `DELETE FROM ${table} WHERE rowid IN (SELECT rowid FROM ${table} WHERE purge_at <= ? AND expires_at <= ? LIMIT ?)`;
    this.deferSql = mysql
      ? `UPDATE ${table} SET purge_at = expires_at WHERE purge_at <= ? AND expires_at > ? ORDER BY purge_at LIMIT ?`
      : `UPDATE ${table} SET purge_at = expires_at WHERE rowid IN (SELECT rowid FROM ${table} WHERE purge_at <= ? AND expires_at > ? LIMIT ?)`;
    this.sql = sqlFunctions(dataSource);
    this.renewals = new StatementBatcher({
      keyOf: ({ lease }) => recordName(lease.id),
      runOne: ({ lease, lockedUntil }) =>
        renewUnderLease(this.dataSource, lease, lockedUntil, this.sql),
      runMany: (renewals) => this.renewMany(renewals),
    });
  }

  complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
    return completeUnderLease(this.dataSource, lease, response, expiresAt, this.sql);
  }

  completeWithin(
    manager: EntityManager,
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
  ): Promise<boolean> {
    return completeUnderLease(manager, lease, response, expiresAt, this.sql);
  }

  release(lease: Lease): Promise<boolean> {
    return releaseUnderLease(this.dataSource, lease);
  }

  renew(lease: Lease, lockedUntil: number): Promise<boolean> {
    return this.renewals.run({ lease, lockedUntil });
  }

  /**
   * Several renewals in one UPDATE. It cannot say which rows it changed, only how many: when that
   * is all of them (the usual case), each is renewed; otherwise each runs again alone (a renewal
   * never moves a lock back, so running one twice changes nothing).
   */
  private async renewMany(
    renewals: readonly { lease: Lease; lockedUntil: number }[],
  ): Promise<(boolean | undefined)[]> {
    const cases = renewals.map(() => 'WHEN ? THEN ?').join(' ');
    const leases = renewals
      .map(() => '(scope = ? AND endpoint = ? AND idempotency_key = ? AND lease_token = ?)')
      .join(' OR ');
    const changed = await affectedRows(
      this.dataSource,
      `UPDATE ${this.table} SET expires_at = ${this.sql.greatest}(expires_at, CASE lease_token ${cases} END)
        WHERE state = 'in_progress' AND (${leases})`,
      [
        ...renewals.flatMap(({ lease, lockedUntil }) => [lease.token, lockedUntil]),
        ...renewals.flatMap(({ lease: { id, token } }) => [id.scope, id.endpoint, id.key, token]),
      ],
    );
    return renewals.map(() => (changed === renewals.length ? true : undefined));
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
          purgeAt: purgeFrom(request),
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
          purgeAt: purgeFrom(request),
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

  /**
   * Up to `limit` expired records, deleted; records whose `purge_at` passed before their
   * `expires_at` (completed or renewed after the claim) get `purge_at` = `expires_at`, and the purge
   * goes on until it deleted `limit` or found nothing more to look at.
   */
  async purgeExpired(now: number, limit: number): Promise<number> {
    let deleted = 0;
    for (;;) {
      deleted += await affectedRows(this.dataSource, this.purgeSql, [now, now, limit - deleted]);
      if (deleted >= limit) return deleted;
      if ((await affectedRows(this.dataSource, this.deferSql, [now, now, limit])) === 0)
        return deleted;
    }
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
            headers: row.responseHeaders
              ? (JSON.parse(row.responseHeaders) as StoredResponse['headers'])
              : {},
            body: row.responseBody,
            bodyEncoding: row.responseBodyEncoding ?? 'json',
            isError: Boolean(row.responseIsError),
          }
        : null,
  };
}
