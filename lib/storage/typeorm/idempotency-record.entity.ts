import { Column, Entity, Index, PrimaryColumn, type DataSource } from 'typeorm';
import type { BodyEncoding, RecordState } from '../idempotency-store.interface.js';

/**
 * Table name of the entity. A DataSource may change it (`entityPrefix`, a naming strategy's
 * `tableName`, a `schema`): the migrations and the store ask the DataSource for the table's path.
 */
export const IDEMPOTENCY_RECORDS_TABLE = 'idempotency_records';

/** bigint arrives from pg as a string (it may exceed 2^53); epoch milliseconds never do. */
const epochMillis = {
  to: (value: number) => value,
  from: (value: string | number | null) => (value === null ? null : Number(value)),
};

/**
 * One Idempotency-Key of one caller on one endpoint. The primary key (scope, endpoint, key) is the
 * unique constraint that decides which of several concurrent duplicates runs the handler.
 *
 * Times are epoch milliseconds in `bigint` columns: the same type and comparison on every database,
 * and no time-zone conversion between the app and the driver.
 *
 * The table belongs to the module's migrations, not to TypeORM's schema synchronisation: a
 * DataSource with `synchronize: true` (or `migration:generate`) leaves it alone. Synchronising it
 * from these decorators would differ from the migrations where databases differ (MySQL: a binary
 * collation for the id, `longtext` bodies) and drop the stored bodies to "fix" them.
 */
@Entity({ name: IDEMPOTENCY_RECORDS_TABLE, synchronize: false })
@Index('idx_idempotency_records_purge_at', ['purgeAt'])
export class IdempotencyRecord {
  /** The caller, from the scope resolver ('' when keys are shared by all callers). */
  @PrimaryColumn({ type: 'varchar', length: 255 })
  scope!: string;

  /** Method and route pattern, e.g. `POST /payments`. */
  @PrimaryColumn({ type: 'varchar', length: 255 })
  endpoint!: string;

  /** The client's Idempotency-Key (`key` is a reserved word in some databases). */
  @PrimaryColumn({ name: 'idempotency_key', type: 'varchar', length: 255 })
  key!: string;

  /** SHA-256 of method, URL and canonical body: a reused key with another payload is refused. */
  @Column({ type: 'varchar', length: 64 })
  fingerprint!: string;

  /** `in_progress` (claimed, its handler running) or `completed` (its response stored). */
  @Column({ type: 'varchar', length: 16 })
  state!: RecordState;

  /** Identifies the claim that owns the record; completion and release require it. */
  @Column({ name: 'lease_token', type: 'varchar', length: 36 })
  leaseToken!: string;

  /** In progress: the lock's end, after which a retry may take over. Completed: the TTL's end. */
  @Column({ name: 'expires_at', type: 'bigint', transformer: epochMillis })
  expiresAt!: number;

  /** When the claim that holds (or completed) the record was made. */
  @Column({ name: 'created_at', type: 'bigint', transformer: epochMillis })
  createdAt!: number;

  /**
   * From when on the purge looks at the record: set by the claim (the earlier of the TTL's end
   * counted from the claim and the lock's end when the claim knows the TTL, else the claim's time),
   * never changed by the renewal, and only lowered by the completion (to the new expiry, for a
   * record the purge deferred while it ran), so that they change no indexed column in the usual
   * case (a HOT update on PostgreSQL). The purge deletes a record only once `expiresAt` has passed
   * too. 0 on rows of 0.1 (see
   * `IdempotencyRecordsHotCompletion1768000000000`).
   */
  @Column({ name: 'purge_at', type: 'bigint', default: 0, transformer: epochMillis })
  purgeAt!: number;

  /** The stored status code; `null` while in progress. */
  @Column({ name: 'response_status', type: 'int', nullable: true })
  responseStatus!: number | null;

  /** JSON object of the stored response headers. */
  @Column({ name: 'response_headers', type: 'text', nullable: true })
  responseHeaders!: string | null;

  /** The stored body, serialised as `responseBodyEncoding` says; `null` for none or in progress. */
  @Column({ name: 'response_body', type: 'text', nullable: true })
  responseBody!: string | null;

  /** `json`, `base64` or `sealed` (encrypted: the body is the envelope); `null` while in progress. */
  @Column({ name: 'response_body_encoding', type: 'varchar', length: 8, nullable: true })
  responseBodyEncoding!: BodyEncoding | null;

  /** The stored response is an error the handler threw (an HttpException): a replay throws it. */
  @Column({ name: 'response_is_error', type: 'boolean', default: false })
  responseIsError!: boolean;
}

/**
 * The records table's path in `dataSource` (`schema.table` where a schema applies): the entity's,
 * with the DataSource's `entityPrefix`, naming strategy and schema; the default name when the
 * entity is not registered in it.
 */
export function recordsTablePath(dataSource: DataSource): string {
  return dataSource.hasMetadata(IdempotencyRecord)
    ? dataSource.getMetadata(IdempotencyRecord).tablePath
    : IDEMPOTENCY_RECORDS_TABLE;
}
