import type { DataSource, EntityManager } from 'typeorm';
import {
  purgeFrom,
  recordName,
  type BodyEncoding,
  type ClaimRequest,
  type ClaimResult,
  type Lease,
  type LeaseState,
  type RecordSnapshot,
  type StoredResponse,
} from '../idempotency-store.interface.js';
import { CHANGE_CHANNEL } from './postgres-change-listener.js';
import { PreparedStatements } from './prepared-statements.js';
import { StatementBatcher } from './statement-batcher.js';
import { leaseStateOf, type StoreDialect } from './store-dialect.js';

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
  response_body_encoding: BodyEncoding | null;
  response_is_error: boolean;
}

/**
 * The claim reads in the statement's snapshot: a row a concurrent transaction inserted or took over
 * after the statement began is neither read nor claimable, so that claim returns nothing; the next
 * attempt sees the row.
 */
const CLAIM_ATTEMPTS = 5;

/** Row of the batched claim: the claim row, and which request (1-based, in the batch) it answers. */
interface BatchClaimRow extends ClaimRow {
  ord: string | number;
}

/** A renewal waiting for its batch. */
interface Renewal {
  readonly lease: Lease;
  readonly lockedUntil: number;
}

/** A completion waiting for its batch. */
interface Completion {
  readonly lease: Lease;
  readonly response: StoredResponse;
  readonly expiresAt: number;
}

/**
 * PostgreSQL and PGlite: a claim is one statement — an insert that, on conflict, takes the row
 * over only when it is dead, and otherwise returns the row as it stands. A first request costs two
 * statements (claim, complete), a replay one (none when the replay cache has it); under load the
 * claims and completions of concurrent requests share statements (one row each, decided as if
 * alone). Every statement here is hand-written SQL run as a prepared statement (see
 * PreparedStatements): these run on every request.
 */
export class PostgresDialect implements StoreDialect {
  private readonly statements: PreparedStatements;
  private readonly sql: ReturnType<typeof buildStatements>;

  /**
   * Claims and completions of concurrent requests, batched (see StatementBatcher): on a server,
   * one round trip, commit and backend wake-up for all of them; on PGlite, whose one session runs
   * one statement at a time, one pass through the protocol and the WebAssembly engine.
   */
  private readonly claims: StatementBatcher<ClaimRequest, ClaimResult> | null = null;
  private readonly completions: StatementBatcher<Completion, boolean> | null = null;
  /**
   * Renewals issued in one tick (one renewal timer renews every running lease at once): one
   * statement for all of them.
   */
  private readonly renewals: StatementBatcher<Renewal, boolean> | null = null;

  constructor(dataSource: DataSource, table: string, batch: boolean) {
    this.statements = new PreparedStatements(dataSource);
    this.sql = buildStatements(table);
    if (!batch) return;
    this.claims = new StatementBatcher({
      keyOf: ({ id }) => recordName(id),
      runOne: (request) => this.claimAlone(request),
      runMany: (requests) => this.claimMany(requests),
    });
    this.completions = new StatementBatcher({
      keyOf: ({ lease }) => recordName(lease.id),
      runOne: ({ lease, response, expiresAt }, afterFailedBatch) =>
        afterFailedBatch
          ? this.completeAgain(lease, response, expiresAt)
          : this.completeOn(undefined, lease, response, expiresAt, null),
      runMany: (completions) => this.completeMany(completions),
    });
    // A renewal run again after its batch failed needs no care: it never moves a lock back.
    this.renewals = new StatementBatcher({
      keyOf: ({ lease }) => recordName(lease.id),
      runOne: ({ lease, lockedUntil }) => this.renewAlone(lease, lockedUntil),
      runMany: (renewals) => this.renewMany(renewals),
    });
  }

  claim(request: ClaimRequest): Promise<ClaimResult> {
    return this.claims ? this.claims.run(request) : this.claimAlone(request);
  }

  /**
   * Several claims in one statement. A request the statement could not decide (its row turned live
   * after the statement's snapshot) is left `undefined`, and claimed again alone.
   */
  private async claimMany(requests: readonly ClaimRequest[]): Promise<(ClaimResult | undefined)[]> {
    const column = <T>(pick: (request: ClaimRequest) => T) => requests.map(pick);
    const { rows } = await this.statements.runPlanned<BatchClaimRow>(this.sql.claimMany, [
      column((request) => request.id.scope),
      column((request) => request.id.endpoint),
      column((request) => request.id.key),
      column((request) => request.fingerprint),
      column((request) => request.token),
      column((request) => request.lockedUntil),
      column((request) => request.now),
      column(purgeFrom),
    ]);
    const results = new Array<ClaimResult | undefined>(requests.length).fill(undefined);
    for (const row of rows) {
      const index = Number(row.ord) - 1;
      results[index] = claimResult(requests[index], row);
    }
    return results;
  }

  /**
   * A completion run again after its batch failed: the batch may have committed before its answer
   * was lost, so a record already completed under this lease counts as stored.
   */
  private async completeAgain(
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
  ): Promise<boolean> {
    if (await this.completeOn(undefined, lease, response, expiresAt, null)) return true;
    return (await this.leaseState(lease)) === 'completed';
  }

  async leaseState(lease: Lease): Promise<LeaseState> {
    const { rows } = await this.statements.run<{ state: string; lease_token: string }>(
      'lease_state',
      this.sql.leaseState,
      [lease.id.scope, lease.id.endpoint, lease.id.key],
    );
    const row = rows[0];
    return leaseStateOf(lease, row ? { state: row.state, token: row.lease_token } : undefined);
  }

  /** Several completions in one statement: each is stored if its own lease is still held. */
  private async completeMany(completions: readonly Completion[]): Promise<boolean[]> {
    const column = <T>(pick: (completion: Completion) => T) => completions.map(pick);
    const { rows } = await this.statements.runPlanned<{ ord: string | number }>(
      this.sql.completeMany,
      [
        ...leaseColumns(completions),
        column(({ expiresAt }) => expiresAt),
        column(({ response }) => response.status),
        column(({ response }) => JSON.stringify(response.headers)),
        column(({ response }) => response.body),
        column(({ response }) => response.bodyEncoding),
        column(({ response }) => response.isError),
      ],
    );
    return answeredRows(rows, completions.length);
  }

  private async claimAlone(request: ClaimRequest): Promise<ClaimResult> {
    const { id, fingerprint, token, now, lockedUntil } = request;
    const params = [
      id.scope,
      id.endpoint,
      id.key,
      fingerprint,
      token,
      lockedUntil,
      now,
      purgeFrom(request),
    ];
    for (let attempt = 1; attempt <= CLAIM_ATTEMPTS; attempt++) {
      const { rows } = await this.statements.run<ClaimRow>('claim', this.sql.claim, params);
      if (rows.length === 0) continue;
      return claimResult(request, rows[0]);
    }
    throw new Error('nestjs-idempotency: the claim kept racing with concurrent writers');
  }

  complete(
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
    changeTag: string | null,
  ): Promise<boolean> {
    // A completion that notifies waiters runs alone (its NOTIFY is part of its statement).
    if (changeTag === null && this.completions)
      return this.completions.run({ lease, response, expiresAt });
    return this.completeOn(undefined, lease, response, expiresAt, changeTag);
  }

  completeWithin(
    manager: EntityManager,
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
    changeTag: string | null,
  ): Promise<boolean> {
    return this.completeOn(manager, lease, response, expiresAt, changeTag);
  }

  renew(lease: Lease, lockedUntil: number): Promise<boolean> {
    return this.renewals
      ? this.renewals.run({ lease, lockedUntil })
      : this.renewAlone(lease, lockedUntil);
  }

  private async renewAlone(lease: Lease, lockedUntil: number): Promise<boolean> {
    const { affected } = await this.statements.run('renew', this.sql.renew, [
      ...leaseParameters(lease),
      lockedUntil,
    ]);
    return affected === 1;
  }

  /** Several renewals in one statement: each extends its lock if its own lease is still held. */
  private async renewMany(renewals: readonly Renewal[]): Promise<boolean[]> {
    const { rows } = await this.statements.runPlanned<{ ord: string | number }>(
      this.sql.renewMany,
      [...leaseColumns(renewals), renewals.map(({ lockedUntil }) => lockedUntil)],
    );
    return answeredRows(rows, renewals.length);
  }

  /** The completion, on the pool or as a statement of the transaction `manager` holds. */
  private async completeOn(
    manager: EntityManager | undefined,
    lease: Lease,
    response: StoredResponse,
    expiresAt: number,
    changeTag: string | null,
  ): Promise<boolean> {
    const within = manager?.queryRunner;
    const values = [
      ...leaseParameters(lease),
      expiresAt,
      response.status,
      JSON.stringify(response.headers),
      response.body,
      response.bodyEncoding,
      response.isError,
    ];
    const { affected } =
      changeTag === null
        ? await this.statements.run('complete', this.sql.complete, values, within)
        : await this.statements.run(
            'complete_notify',
            this.sql.completeAndNotify,
            [...values, changeTag],
            within,
          );
    return affected === 1;
  }

  async release(lease: Lease, changeTag: string | null): Promise<boolean> {
    const values = leaseParameters(lease);
    const { affected } =
      changeTag === null
        ? await this.statements.run('release', this.sql.release, values)
        : await this.statements.run('release_notify', this.sql.releaseAndNotify, [
            ...values,
            changeTag,
          ]);
    return affected === 1;
  }

  /**
   * Up to `limit` expired records, deleted. A record the purge looked at too early (completed, or
   * renewed, after its claim set `purge_at`) is not deleted: its `purge_at` moves up to its
   * `expires_at`, and the purge goes on until it deleted `limit` or found nothing more to look at.
   */
  async purgeExpired(now: number, limit: number): Promise<number> {
    let deleted = 0;
    while (deleted < limit) {
      const { rows } = await this.statements.run<{ deleted: number; deferred: number }>(
        'purge',
        this.sql.purge,
        [now, limit - deleted],
      );
      deleted += Number(rows[0]?.deleted ?? 0);
      if (Number(rows[0]?.deferred ?? 0) === 0) break;
    }
    return deleted;
  }
}

/** $1 scope, $2 endpoint, $3 key, $4 lease token. */
function leaseParameters({ id, token }: Lease): string[] {
  return [id.scope, id.endpoint, id.key, token];
}

/** The same four of a batched statement, as one array each (its first four `unnest` columns). */
function leaseColumns(items: readonly { readonly lease: Lease }[]): string[][] {
  return [
    items.map(({ lease }) => lease.id.scope),
    items.map(({ lease }) => lease.id.endpoint),
    items.map(({ lease }) => lease.id.key),
    items.map(({ lease }) => lease.token),
  ];
}

/** For each of `count` inputs of a batched statement, whether it returned that input's `ord` (from 1). */
function answeredRows(rows: readonly { ord: string | number }[], count: number): boolean[] {
  const answered = new Array<boolean>(count).fill(false);
  for (const row of rows) answered[Number(row.ord) - 1] = true;
  return answered;
}

/** The table's columns a claim reads back, named rather than `*`: a prepared statement's result
 * type must not change when a later migration adds a column. */
const COLUMNS = `fingerprint, state, lease_token, expires_at, response_status, response_headers,
  response_body, response_body_encoding, response_is_error`;

function buildStatements(table: string) {
  const underLease = `scope = $1 AND endpoint = $2 AND idempotency_key = $3 AND lease_token = $4 AND state = 'in_progress'`;
  // purge_at = LEAST(purge_at, expires_at): a row the purge deferred while it ran (to its lock's
  // end) is purged at its TTL, not at that lock's end; for any other row the value is unchanged, so
  // the update stays HOT.
  const completion = `UPDATE ${table} SET state = 'completed', expires_at = $5, purge_at = LEAST(purge_at, $5), response_status = $6,
      response_headers = $7, response_body = $8, response_body_encoding = $9, response_is_error = $10
    WHERE ${underLease}`;
  return {
    /**
     * $1 scope, $2 endpoint, $3 key, $4 fingerprint, $5 lease token, $6 locked until, $7 now,
     * $8 purge from (see \`purgeFrom\`).
     * `live` reads the row unless it is dead — its time is up, and it either completed (an expired
     * key counts as new, whatever its payload) or is an abandoned in-progress claim of the same
     * payload (a different payload under an abandoned key is still a 422: the key stays bound to
     * its first payload). Only without a live row does the insert run, taking a dead row over on
     * conflict under the same condition. Reading first keeps replays and 409s read-only: an
     * `ON CONFLICT DO UPDATE` that updates nothing still locks the row, and its WAL record makes
     * the commit wait for a flush (≈2× the replay throughput in bench/). A row that turns live
     * between the statement's snapshot and its insert is neither read nor taken over: the claim
     * returns nothing and is run again.
     */
    claim: `WITH live AS (
    SELECT ${COLUMNS} FROM ${table}
    WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3
      AND NOT (expires_at <= $7 AND (state = 'completed' OR fingerprint = $4))
  ), claimed AS (
    INSERT INTO ${table} AS r (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
      expires_at, created_at, purge_at, response_is_error)
    SELECT $1, $2, $3, $4, 'in_progress', $5::varchar, $6::bigint, $7, $8::bigint, false
    WHERE NOT EXISTS (SELECT 1 FROM live)
    ON CONFLICT (scope, endpoint, idempotency_key) DO UPDATE SET
      fingerprint = EXCLUDED.fingerprint, state = 'in_progress', lease_token = EXCLUDED.lease_token,
      expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at,
      purge_at = EXCLUDED.purge_at, response_status = NULL,
      response_headers = NULL, response_body = NULL, response_body_encoding = NULL,
      response_is_error = false
    WHERE r.expires_at <= $7 AND (r.state = 'completed' OR r.fingerprint = EXCLUDED.fingerprint)
    RETURNING ${COLUMNS.replace(/(\w+)/g, 'r.$1')}, (r.xmax = 0) AS inserted
  )
  SELECT true AS claimed, ${COLUMNS}, inserted FROM claimed
  UNION ALL
  SELECT false AS claimed, ${COLUMNS}, false AS inserted FROM live`,
    /**
     * The claim of several requests ($1–$8: arrays of scope, endpoint, key, fingerprint, lease token,
     * locked until, now, purge from; one row each, distinct ids), each exactly as \`claim\` decides it. \`ord\`
     * says which request a result row answers; a request with no row is claimed again alone.
     */
    claimMany: `WITH input AS (
    SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::varchar[], $6::bigint[], $7::bigint[], $8::bigint[])
      WITH ORDINALITY AS i(scope, endpoint, idempotency_key, fingerprint, lease_token, locked_until, now, purge_at, ord)
  ), live AS (
    SELECT i.ord, ${COLUMNS.replace(/(\w+)/g, 'r.$1')} FROM input i JOIN ${table} r
      ON r.scope = i.scope AND r.endpoint = i.endpoint AND r.idempotency_key = i.idempotency_key
    WHERE NOT (r.expires_at <= i.now AND (r.state = 'completed' OR r.fingerprint = i.fingerprint))
  ), claimed AS (
    INSERT INTO ${table} AS r (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
      expires_at, created_at, purge_at, response_is_error)
    SELECT i.scope, i.endpoint, i.idempotency_key, i.fingerprint, 'in_progress', i.lease_token, i.locked_until, i.now, i.purge_at, false
    FROM input i WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.ord = i.ord)
    ORDER BY i.ord
    ON CONFLICT (scope, endpoint, idempotency_key) DO UPDATE SET
      fingerprint = EXCLUDED.fingerprint, state = 'in_progress', lease_token = EXCLUDED.lease_token,
      expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at,
      purge_at = EXCLUDED.purge_at, response_status = NULL,
      response_headers = NULL, response_body = NULL, response_body_encoding = NULL,
      response_is_error = false
    WHERE r.expires_at <= EXCLUDED.created_at AND (r.state = 'completed' OR r.fingerprint = EXCLUDED.fingerprint)
    RETURNING r.scope, r.endpoint, r.idempotency_key, (r.xmax = 0) AS inserted
  )
  SELECT i.ord, true AS claimed, c.inserted, NULL::varchar AS fingerprint, NULL::varchar AS state,
    NULL::varchar AS lease_token, NULL::bigint AS expires_at, NULL::int AS response_status,
    NULL::text AS response_headers, NULL::text AS response_body, NULL::varchar AS response_body_encoding,
    NULL::boolean AS response_is_error
  FROM claimed c JOIN input i
    ON i.scope = c.scope AND i.endpoint = c.endpoint AND i.idempotency_key = c.idempotency_key
  UNION ALL
  SELECT ord, false AS claimed, false AS inserted, ${COLUMNS} FROM live`,
    /** $1–$4 the lease, $5 expires at, $6–$10 the response. */
    complete: completion,
    /**
     * The completion of several leases ($1–$10: arrays of scope, endpoint, key, lease token,
     * expires at, status, headers, body, body encoding, is error; distinct ids), each stored only
     * if its own lease is held. Returns the \`ord\` of each stored one.
     */
    completeMany: `UPDATE ${table} AS r SET state = 'completed', expires_at = i.expires_at,
      purge_at = LEAST(r.purge_at, i.expires_at),
      response_status = i.status, response_headers = i.headers, response_body = i.body,
      response_body_encoding = i.encoding, response_is_error = i.is_error
    FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::bigint[], $6::int[],
      $7::text[], $8::text[], $9::varchar[], $10::boolean[])
      WITH ORDINALITY AS i(scope, endpoint, idempotency_key, lease_token, expires_at, status, headers,
        body, encoding, is_error, ord)
    WHERE r.scope = i.scope AND r.endpoint = i.endpoint AND r.idempotency_key = i.idempotency_key
      AND r.lease_token = i.lease_token AND r.state = 'in_progress'
    RETURNING i.ord`,
    /**
     * The write and its NOTIFY in one statement ($11 the change tag): PostgreSQL delivers the
     * notification when the statement commits, so a woken waiter always reads the new state. A
     * data-modifying CTE runs in full whatever the outer query reads; pg_notify runs once per
     * changed row (0 or 1).
     */
    completeAndNotify: `WITH changed AS (${completion} RETURNING 1)
      SELECT pg_notify('${CHANGE_CHANNEL}', $11) FROM changed`,
    release: `DELETE FROM ${table} WHERE ${underLease}`,
    /** $1 scope, $2 endpoint, $3 key. */
    leaseState: `SELECT state, lease_token FROM ${table}
      WHERE scope = $1 AND endpoint = $2 AND idempotency_key = $3`,
    /** $1–$4 the lease, $5 locked until: never moves a lock back. */
    renew: `UPDATE ${table} SET expires_at = GREATEST(expires_at, $5::bigint) WHERE ${underLease}`,
    /**
     * The renewal of several leases ($1–$5: arrays of scope, endpoint, key, lease token, locked
     * until; distinct ids), each as \`renew\` does it. Returns the \`ord\` of each renewed one.
     */
    renewMany: `UPDATE ${table} AS r SET expires_at = GREATEST(r.expires_at, i.locked_until)
    FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::bigint[])
      WITH ORDINALITY AS i(scope, endpoint, idempotency_key, lease_token, locked_until, ord)
    WHERE r.scope = i.scope AND r.endpoint = i.endpoint AND r.idempotency_key = i.idempotency_key
      AND r.lease_token = i.lease_token AND r.state = 'in_progress'
    RETURNING i.ord`,
    releaseAndNotify: `WITH changed AS (DELETE FROM ${table} WHERE ${underLease} RETURNING 1)
      SELECT pg_notify('${CHANGE_CHANNEL}', $5) FROM changed`,
    /**
     * ctid batches: at most \`limit\` ($2) rows whose \`purge_at\` has passed, by physical address;
     * of these, the ones whose \`expires_at\` has passed too are deleted, and the others get
     * \`purge_at\` = \`expires_at\` (the purge looked at them too early). Both re-check what they
     * change. No row locks in the inner select: locking doubles the WAL a batch writes (≈1.5×
     * slower in bench/), and a row a concurrent takeover holds is skipped anyway — the delete
     * waits for it, then finds a new row version (another ctid, a new expiry).
     */
    purge: `WITH scanned AS MATERIALIZED (
        SELECT ctid, expires_at <= $1 AS expired FROM ${table} WHERE purge_at <= $1 LIMIT $2
      ), deleted AS (
        DELETE FROM ${table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM scanned WHERE expired))
          AND expires_at <= $1 AND purge_at <= $1
        RETURNING 1
      ), deferred AS (
        UPDATE ${table} SET purge_at = expires_at
        WHERE ctid = ANY(ARRAY(SELECT ctid FROM scanned WHERE NOT expired))
          AND expires_at > $1 AND purge_at <= $1
        RETURNING 1
      )
      SELECT (SELECT count(*) FROM deleted)::int AS deleted,
        (SELECT count(*) FROM deferred)::int AS deferred`,
  };
}

/**
 * What a claim row says. A row in progress under the request's own token is its own claim, made by
 * an earlier run of this very request whose answer was lost (a batch that committed, then lost its
 * connection): claimed, not a conflict with itself.
 */
function claimResult({ id, token }: ClaimRequest, row: ClaimRow): ClaimResult {
  if (row.claimed) return { claimed: true, lease: { id, token }, takeover: !row.inserted };
  if (row.state === 'in_progress' && row.lease_token === token)
    return { claimed: true, lease: { id, token }, takeover: false };
  return { claimed: false, record: toSnapshot(row) };
}

function toSnapshot(row: ClaimRow): RecordSnapshot {
  return {
    state: row.state,
    fingerprint: row.fingerprint,
    token: row.lease_token,
    expiresAt: Number(row.expires_at),
    response:
      row.state === 'completed' && row.response_status !== null
        ? {
            status: row.response_status,
            headers: row.response_headers
              ? (JSON.parse(row.response_headers) as StoredResponse['headers'])
              : {},
            body: row.response_body,
            bodyEncoding: row.response_body_encoding ?? 'json',
            isError: row.response_is_error,
          }
        : null,
  };
}
