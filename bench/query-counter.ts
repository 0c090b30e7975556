import { createRequire } from 'node:module';
import type { Logger as TypeOrmLogger } from 'typeorm';

/** A statement as TypeORM sent it. */
export interface Statement {
  readonly query: string;
  readonly parameters: unknown[];
}

/** Counted statements, keyed by their first words (enough to tell claim from complete). */
export interface QueryCounts {
  /** Statements TypeORM sent (its logger's `logQuery`): PostgreSQL and PGlite. */
  readonly typeorm: number;
  /** Statements the `pg` driver sent on the wire (PostgreSQL only; null on PGlite). */
  readonly wire: number | null;
  readonly byStatement: Record<string, number>;
  /** Batched statements (an array as first parameter: several requests' rows), and their rows. */
  readonly batches: number;
  readonly batchRows: number;
  /**
   * Commits: each statement outside a transaction, plus each COMMIT. Exact only while requests run
   * one at a time (countQueries), since one flag tracks whether a transaction is open.
   */
  readonly commits: number;
}

/**
 * Counts every statement in two places: TypeORM's logger (called for each query on every driver)
 * and `pg.Client#query` (every round trip to the server, including any TypeORM does not log). If
 * the two disagree, something talks to PostgreSQL behind TypeORM's back.
 */
export class QueryCounter implements TypeOrmLogger {
  private typeorm = 0;
  private wire = 0;
  private wirePatched = false;
  private byStatement = new Map<string, number>();
  private recording: Statement[] | undefined;
  private commits = 0;
  private inTransaction = false;
  private batches = 0;
  private batchRows = 0;

  logQuery(query: string, parameters?: unknown[]): void {
    this.typeorm++;
    const label = labelOf(query);
    if (label === 'START' || label === 'BEGIN') this.inTransaction = true;
    else if (label === 'COMMIT' || label === 'ROLLBACK') {
      this.inTransaction = false;
      if (label === 'COMMIT') this.commits++;
    } else if (!this.inTransaction) this.commits++;
    this.byStatement.set(label, (this.byStatement.get(label) ?? 0) + 1);
    if (Array.isArray(parameters?.[0])) {
      this.batches++;
      this.batchRows += parameters[0].length;
    }
    this.recording?.push({ query, parameters: parameters ?? [] });
  }

  /**
   * The statements the library sends while `work` runs, exactly as sent (its SQL is private and
   * the query builder's is generated), for EXPLAIN. Only for work that runs alone on the DataSource.
   */
  async capture<T>(work: () => Promise<T>): Promise<{ result: T; statements: Statement[] }> {
    const statements: Statement[] = [];
    this.recording = statements;
    try {
      return { result: await work(), statements };
    } finally {
      this.recording = undefined;
    }
  }
  logQueryError(): void {}
  logQuerySlow(): void {}
  logSchemaBuild(): void {}
  logMigration(): void {}
  log(): void {}

  /** Wraps the pg driver TypeORM loads (the same CommonJS module instance as this require). */
  patchPgClient(): void {
    if (this.wirePatched) return;
    const pg = createRequire(import.meta.url)('pg') as {
      Client: { prototype: { query: (...args: unknown[]) => unknown } };
    };
    const original = pg.Client.prototype.query;
    const countWire = () => this.wire++;
    pg.Client.prototype.query = function (this: unknown, ...args: unknown[]) {
      countWire();
      return original.apply(this, args);
    };
    this.wirePatched = true;
  }

  reset(): void {
    this.typeorm = 0;
    this.wire = 0;
    this.byStatement = new Map();
    this.commits = 0;
    this.inTransaction = false;
    this.batches = 0;
    this.batchRows = 0;
  }

  read(): QueryCounts {
    return {
      typeorm: this.typeorm,
      wire: this.wirePatched ? this.wire : null,
      byStatement: Object.fromEntries(this.byStatement),
      commits: this.commits,
      batches: this.batches,
      batchRows: this.batchRows,
    };
  }
}

/** "WITH claimed AS (INSERT ..." → "WITH claimed AS", "UPDATE "bench"."idempotency_records" ..." → "UPDATE". */
function labelOf(query: string): string {
  // The first words only: splitting a whole batched statement would cost the app under load.
  const words = query.trimStart().slice(0, 64).split(/\s+/, 3);
  return words[0].toUpperCase() === 'WITH' ? words.slice(0, 3).join(' ') : words[0].toUpperCase();
}
