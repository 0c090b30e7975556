import type { DataSource, EntityManager } from 'typeorm';
import type {
  ClaimRequest,
  ClaimResult,
  IdempotencyStore,
  Lease,
  LeaseState,
  RecordDetails,
  RecordId,
  RecordInvalidation,
  RecordQuery,
  RecordState,
  RecordWatch,
  StoredResponse,
  StoreTransaction,
} from '../idempotency-store.interface.js';
import { IdempotencyRecord } from './idempotency-record.entity.js';
import { isOneRunnerAtATime } from './pglite-driver.js';
import { PortableDialect } from './portable.dialect.js';
import {
  CHANGE_CHANNEL,
  changeTag,
  INVALIDATION_PREFIX,
  PostgresChangeListener,
} from './postgres-change-listener.js';
import { PostgresDialect } from './postgres.dialect.js';
import { qualifiedTable, type StoreDialect } from './store-dialect.js';

/** Databases the TypeORM store runs on, by TypeORM driver type. */
const SUPPORTED = ['postgres', 'mysql', 'mariadb', 'better-sqlite3'] as const;

/**
 * Opens the transaction of a transactional route and runs `work` in it with the transaction's
 * EntityManager; commits when `work` resolves, rolls back when it rejects. The default is
 * `(work) => dataSource.transaction(work)`; with `@nestjs-cls/transactional`, for instance,
 * `(work) => txHost.withTransaction(() => work(txHost.tx))`, so the handler's `@Transactional()`
 * code joins the same transaction.
 */
export type TransactionRunner = <T>(work: (manager: EntityManager) => Promise<T>) => Promise<T>;

/** Options of the TypeORM store. */
export interface TypeOrmIdempotencyStoreOptions {
  /**
   * How transactional routes open their transaction (see {@link TransactionRunner}). It must open
   * it on this store's DataSource.
   * @default (work) => dataSource.transaction(work)
   */
  readonly transactionRunner?: TransactionRunner;
  /**
   * On PostgreSQL (with the `pg` driver), wake waiting duplicates through LISTEN/NOTIFY: one
   * listening connection per store, opened on the first wait (and checked with a probe NOTIFY:
   * behind a pooler in transaction mode, they poll). `false`: they poll. Elsewhere (PGlite,
   * MySQL/MariaDB, SQLite) they always poll.
   * @default true
   */
  readonly waitNotifications?: boolean;
  /**
   * The LISTEN connection's own connection string, for a DataSource behind a pooler in
   * transaction mode (see the module option of that name).
   * @default the DataSource pool's own connection options
   */
  readonly listenerUrl?: string;
  /**
   * On PostgreSQL and PGlite, the claims (and the completions) of concurrent requests share one
   * statement per turn of the event loop, each row decided as if alone. `false`: one statement per
   * request (the bench compares the two).
   * @default true
   */
  readonly batchStatements?: boolean;
}

/**
 * Records in a TypeORM `DataSource`: PostgreSQL (and PGlite through `typeorm-pglite`) with a
 * one-statement claim and prepared statements, MySQL/MariaDB and SQLite (better-sqlite3) with a
 * portable QueryBuilder claim. Completion and release are conditional on the lease token; on
 * PostgreSQL a watched lease's completion or release also sends a NOTIFY in the same statement.
 *
 * Call `close()` when done with a store you built yourself (the module closes its own).
 */
export class TypeOrmIdempotencyStore implements IdempotencyStore {
  private readonly dialect: StoreDialect;
  private readonly table: string;
  /** PostgreSQL with notifications on: the LISTEN connection of waiters; otherwise they poll. */
  private readonly listener: PostgresChangeListener | null;

  private readonly transactionRunner: TransactionRunner;

  constructor(
    private readonly dataSource: DataSource,
    options: TypeOrmIdempotencyStoreOptions = {},
  ) {
    this.transactionRunner = options.transactionRunner ?? ((work) => dataSource.transaction(work));
    if (!dataSource.isInitialized) {
      // Its entities are known only once it is: the check below would blame the entity list.
      throw new Error(
        'nestjs-idempotency: the DataSource given to TypeOrmIdempotencyStore is not initialised yet. ' +
          'Await `dataSource.initialize()` before building the store (IdempotencyModule does so for a DataSource given as `dataSource`).',
      );
    }
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
    this.table = qualifiedTable(dataSource, dataSource.getMetadata(IdempotencyRecord).tablePath);
    this.dialect =
      type === 'postgres'
        ? new PostgresDialect(dataSource, this.table, options.batchStatements ?? true)
        : new PortableDialect(dataSource, this.table);
    this.listener =
      type === 'postgres' && options.waitNotifications !== false
        ? PostgresChangeListener.forDataSource(dataSource, { url: options.listenerUrl })
        : null;
  }

  claim(request: ClaimRequest): Promise<ClaimResult> {
    return this.dialect.claim(request);
  }

  complete(lease: Lease, response: StoredResponse, expiresAt: number): Promise<boolean> {
    return this.dialect.complete(lease, response, expiresAt, this.changeTagOf(lease));
  }

  release(lease: Lease): Promise<boolean> {
    return this.dialect.release(lease, this.changeTagOf(lease));
  }

  renew(lease: Lease, lockedUntil: number): Promise<boolean> {
    return this.dialect.renew(lease, lockedUntil);
  }

  leaseState(lease: Lease): Promise<LeaseState> {
    return this.dialect.leaseState(lease);
  }

  transaction<T>(work: (transaction: StoreTransaction) => Promise<T>): Promise<T> {
    return this.transactionRunner((manager) => {
      if (manager.connection !== this.dataSource || !manager.queryRunner?.isTransactionActive) {
        throw new Error(
          'nestjs-idempotency: the transactionRunner must run its work in a transaction of the DataSource the idempotency store uses.',
        );
      }
      return work({
        manager,
        complete: (lease, response, expiresAt) =>
          this.dialect.completeWithin(manager, lease, response, expiresAt, this.changeTagOf(lease)),
      });
    });
  }

  transactionsUnsupported(): string | undefined {
    const options = this.dataSource.options as { type: string; driver?: unknown };
    if (options.type === 'better-sqlite3') {
      return "TypeORM's better-sqlite3 driver shares one connection among all requests, so one request's transaction would take in the statements of every other request. Use PostgreSQL, PGlite or MySQL/MariaDB for transactional routes.";
    }
    if (
      options.type === 'postgres' &&
      options.driver !== undefined &&
      !isOneRunnerAtATime(options.driver)
    ) {
      return "this PGlite DataSource shares its one session among all requests, so one request's transaction would take in the statements of every other request. Build it with the library's driver: `{ type: 'postgres', driver: pgliteDriver({ dataDir }) }`.";
    }
    return undefined;
  }

  purgeExpired(now: number, limit: number): Promise<number> {
    return this.dialect.purgeExpired(now, limit);
  }

  watch(id: RecordId): RecordWatch | undefined {
    return this.listener?.watch(this.tagOf(id));
  }

  /** The records that match `query`, read on the primary (see `IdempotencyAdmin`). */
  async findRecords(query: RecordQuery): Promise<RecordDetails[]> {
    const runner = this.dataSource.createQueryRunner('master');
    try {
      const select = runner.manager
        .getRepository(IdempotencyRecord)
        .createQueryBuilder('r')
        .where('1 = 1');
      if (query.key !== undefined) select.andWhere('r.key = :key', { key: query.key });
      if (query.scope !== undefined) select.andWhere('r.scope = :scope', { scope: query.scope });
      if (query.endpoint !== undefined)
        select.andWhere('r.endpoint = :endpoint', { endpoint: query.endpoint });
      if (query.state !== undefined) select.andWhere('r.state = :state', { state: query.state });
      if (query.createdBefore !== undefined)
        select.andWhere('r.createdAt < :createdBefore', { createdBefore: query.createdBefore });
      const rows = await select
        .orderBy('r.createdAt', 'ASC')
        .addOrderBy('r.scope', 'ASC')
        .addOrderBy('r.endpoint', 'ASC')
        .take(query.limit)
        .cache(false)
        .getMany();
      return rows.map(recordDetails);
    } finally {
      await runner.release();
    }
  }

  /**
   * Deletes the record if it is still as seen. On PostgreSQL the same statement sends two
   * NOTIFYs, delivered when it commits: the record's change tag (its waiting duplicates re-read)
   * and its invalidation (replay caches drop it).
   */
  async deleteRecord(
    id: RecordId,
    seen: { readonly state: RecordState; readonly token: string },
  ): Promise<boolean> {
    if (this.dataSource.driver.options.type === 'postgres') {
      const tag = this.tagOf(id);
      const rows: unknown[] = await this.dataSource.query(
        `WITH changed AS (DELETE FROM ${this.table} WHERE scope = $1 AND endpoint = $2
           AND idempotency_key = $3 AND state = $4 AND lease_token = $5 RETURNING 1)
         SELECT pg_notify('${CHANGE_CHANNEL}', $6), pg_notify('${CHANGE_CHANNEL}', $7) FROM changed`,
        [
          id.scope,
          id.endpoint,
          id.key,
          seen.state,
          seen.token,
          tag,
          `${INVALIDATION_PREFIX}${tag}`,
        ],
      );
      return rows.length === 1;
    }
    const result = await this.dataSource
      .createQueryBuilder()
      .delete()
      .from(IdempotencyRecord)
      .where(
        'scope = :scope AND endpoint = :endpoint AND idempotency_key = :key AND state = :state AND lease_token = :token',
        { ...id, state: seen.state, token: seen.token },
      )
      .execute();
    return result.affected === 1;
  }

  /**
   * On PostgreSQL through `pg` with `waitNotifications` on: the invalidations sent by
   * `deleteRecord` in any process, on the LISTEN connection of waiting duplicates (opened now).
   * Elsewhere `undefined`: PGlite is one process, and MySQL/MariaDB and SQLite have no
   * notifications.
   */
  onInvalidated(listener: (invalidation: RecordInvalidation) => void): (() => void) | undefined {
    return this.listener?.onInvalidated((tag, listening) =>
      listener(
        tag === null
          ? { all: true, listening }
          : { all: false, matches: (id) => this.tagOf(id) === tag },
      ),
    );
  }

  /** Closes the LISTEN connection, if one is open; the DataSource is left as it is. */
  async close(): Promise<void> {
    await this.listener?.close();
  }

  private tagOf(id: RecordId): string {
    return changeTag(this.table, id);
  }

  /** Whom to wake when this lease ends: nobody unless its route waits and notifications are on. */
  private changeTagOf(lease: Lease): string | null {
    return lease.watched && this.listener ? this.tagOf(lease.id) : null;
  }
}

function recordDetails(row: IdempotencyRecord): RecordDetails {
  return {
    id: { scope: row.scope, endpoint: row.endpoint, key: row.key },
    state: row.state,
    fingerprint: row.fingerprint,
    token: row.leaseToken,
    createdAt: row.createdAt,
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
