import { createHash } from 'node:crypto';
import type { DataSource, QueryRunner } from 'typeorm';
import { sessionsPersist } from './pg-connections.js';
import { quietLogger } from '../../utils/quiet-logger.js';

/** What a statement returned: its rows, and how many rows it changed. */
export interface StatementResult<Row> {
  readonly rows: Row[];
  readonly affected: number;
}

/** The part of a `pg` client used here. */
interface PgClient {
  query(config: { name: string; text: string; values: unknown[] }): Promise<PgResult>;
  query(text: string, values: unknown[]): Promise<PgResult>;
}
interface PgResult {
  rows: unknown[];
  rowCount: number | null;
}

/**
 * Server errors that mean named prepared statements cannot be used on this connection path:
 * 26000 / 42P05 from a pooler that hands each transaction another server connection (PgBouncer in
 * transaction mode before 1.21), 0A000 when the table changed shape under a cached plan.
 */
const REFUSALS = new Set(['26000', '42P05', '0A000']);

/**
 * How the statements run. `protocol`: named prepared statements of the `pg` driver (a Parse once
 * per connection, then Bind/Execute). `sql`: for a driver that replaces `pg` — typeorm-pglite,
 * whose client takes no query configs — `PREPARE` once per session and `EXECUTE` with the values
 * inlined as literals (EXECUTE takes no bind parameters). `plain`: ordinary statements, after a
 * server refused prepared ones.
 */
type Mode = 'protocol' | 'sql' | 'plain';

/**
 * Runs the store's per-request statements on PostgreSQL as prepared statements: the server parses
 * and plans each once per session instead of on every request — for the claim, planning costs more
 * than executing, on a server (see bench/results.md) and more so in PGlite's WASM build. Statements
 * still go through TypeORM's pool and are reported to its logger. After the server refused a
 * prepared statement once they run as ordinary statements.
 */
export class PreparedStatements {
  private readonly logger = quietLogger('Idempotency');
  private mode: Mode;
  private readonly sqlNames = new Map<string, string>();
  /** SQL-level statements this store has prepared (or found prepared) in the session. */
  private readonly sqlPrepared = new Set<string>();
  /**
   * Whether named statements may run inside a transaction: only once sessions are known to
   * persist (no pooler in transaction mode), since a refused one there would abort the
   * transaction with the handler's writes. Found out on the first transaction (`sessionsPersist`).
   */
  private sessions: 'unknown' | 'checking' | 'persistent' = 'unknown';
  /** After a check that could not reach the database, when to try again. */
  private nextCheckAt = 0;

  constructor(private readonly dataSource: DataSource) {
    const options = dataSource.options as { type: string; driver?: unknown };
    this.mode =
      options.type !== 'postgres' ? 'plain' : options.driver === undefined ? 'protocol' : 'sql';
  }

  /**
   * Runs `text` with `values`; `name` identifies the statement, one name per distinct text. On a
   * runner of the pool, or on `within` (a transaction's runner, left open) when given.
   */
  async run<Row>(
    name: string,
    text: string,
    values: unknown[],
    within?: QueryRunner,
  ): Promise<StatementResult<Row>> {
    const runner = within ?? this.dataSource.createQueryRunner();
    try {
      // Inside a transaction, a refused named statement would abort the whole transaction (the
      // handler's writes with it) before the fallback could run: there it runs unnamed until the
      // sessions are known to persist. Behind a pooler in transaction mode (PgBouncer before
      // 1.21), any Bind may land on a server connection that never saw the Parse.
      if (this.mode === 'protocol' && within && !this.namedInTransactions()) {
        return await ordinary<Row>(runner, text, values);
      }
      if (this.mode === 'protocol') return await this.runNamed<Row>(runner, name, text, values);
      if (this.mode === 'sql') return await this.runExecute<Row>(runner, name, text, values);
      return await ordinary<Row>(runner, text, values);
    } finally {
      if (!within) await runner.release();
    }
  }

  /** True once sessions are known to persist; starts finding out on the first call. */
  private namedInTransactions(): boolean {
    if (this.sessions === 'persistent') return true;
    if (this.sessions === 'unknown' && Date.now() >= this.nextCheckAt) {
      this.sessions = 'checking';
      sessionsPersist(this.dataSource).then(
        (persist) => {
          if (persist) {
            this.sessions = 'persistent';
            return;
          }
          this.mode = 'plain';
          this.logger.log(
            "This DataSource's sessions do not last between transactions (a pooler in transaction mode, such as PgBouncer): the store runs its statements unprepared.",
          );
        },
        () => {
          this.sessions = 'unknown';
          this.nextCheckAt = Date.now() + 30_000;
        },
      );
    }
    return false;
  }

  /**
   * Runs `text` as an ordinary statement, planned for its values each time: for statements whose
   * best plan depends on the table's size and the values (the batched ones join arrays to the
   * table, and a plan cached while the table was small would scan it whole once it has grown).
   */
  async runPlanned<Row>(text: string, values: unknown[]): Promise<StatementResult<Row>> {
    const runner = this.dataSource.createQueryRunner();
    try {
      return await ordinary<Row>(runner, text, values);
    } finally {
      await runner.release();
    }
  }

  /**
   * A protocol-level named statement. Its name carries a hash of the text: behind a pooler in
   * transaction mode a server connection may hold a statement of that name prepared by another
   * client (another app, another table), and a Bind by name would run it; with the hash, a
   * statement found under the name is this very one.
   */
  private async runNamed<Row>(runner: QueryRunner, name: string, text: string, values: unknown[]) {
    const client = (await runner.connect()) as PgClient;
    this.dataSource.logger.logQuery(text, values, runner);
    try {
      return await this.logged<Row>(runner, text, values, () =>
        client.query({ name: this.sqlNameOf(name, text), text, values }),
      );
    } catch (error) {
      if (!this.refused(error)) throw error;
      return this.logged<Row>(runner, text, values, () => client.query(text, values));
    }
  }

  /**
   * Runs a statement on the `pg` client itself, reporting to the DataSource's logger what TypeORM
   * reports of its own queries: a statement slower than `maxQueryExecutionTime`, and a failure
   * (but for a refused prepared statement, which is run again unprepared).
   */
  private async logged<Row>(
    runner: QueryRunner,
    text: string,
    values: unknown[],
    query: () => Promise<PgResult>,
  ): Promise<StatementResult<Row>> {
    const logger = this.dataSource.logger;
    const startedAt = Date.now();
    let result: PgResult;
    try {
      result = await query();
    } catch (error) {
      if (!REFUSALS.has(errorCode(error) ?? ''))
        logger.logQueryError(error as Error, text, values, runner);
      throw error;
    }
    const elapsedMs = Date.now() - startedAt;
    const slowMs = (this.dataSource.options as { maxQueryExecutionTime?: number })
      .maxQueryExecutionTime;
    if (slowMs && elapsedMs > slowMs) logger.logQuerySlow(elapsedMs, text, values, runner);
    return asResult<Row>(result);
  }

  /**
   * `PREPARE` on first use, then `EXECUTE`. A session that lost the statement (26000: `DEALLOCATE`,
   * or a new session behind the same DataSource) has it prepared again. The name carries a hash of
   * the text, so two stores sharing one session (another table name) never run each other's
   * statement, and a 42P05 from `PREPARE` means the very same statement is already there.
   */
  private async runExecute<Row>(
    runner: QueryRunner,
    name: string,
    text: string,
    values: unknown[],
  ) {
    const statement = this.sqlNameOf(name, text);
    if (!this.sqlPrepared.has(statement) && !(await this.prepare(runner, statement, text))) {
      return ordinary<Row>(runner, text, values);
    }
    const execute = `EXECUTE ${statement}(${values.map(sqlLiteral).join(', ')})`;
    try {
      return await ordinary<Row>(runner, execute, []);
    } catch (error) {
      if (errorCode(error) !== '26000') throw error;
    }
    this.sqlPrepared.delete(statement);
    if (!(await this.prepare(runner, statement, text))) return ordinary<Row>(runner, text, values);
    return ordinary<Row>(runner, execute, []);
  }

  /** `PREPARE`s `text` as `statement`; false if the server refuses prepared statements. */
  private async prepare(runner: QueryRunner, statement: string, text: string): Promise<boolean> {
    try {
      await runner.query(`PREPARE ${statement} AS ${text}`);
    } catch (error) {
      if (errorCode(error) !== '42P05') {
        if (!this.refused(error)) throw error;
        return false;
      }
    }
    this.sqlPrepared.add(statement);
    return true;
  }

  /** The SQL-level statement name of `name`: hashed once per statement, not on every request. */
  private sqlNameOf(name: string, text: string): string {
    let statement = this.sqlNames.get(name);
    if (!statement) {
      statement = `nestjs_idempotency_${name}_${createHash('sha256').update(text).digest('hex').slice(0, 12)}`;
      this.sqlNames.set(name, statement);
    }
    return statement;
  }

  /** Whether `error` means prepared statements cannot be used here; if so, stops using them. */
  private refused(error: unknown): boolean {
    const code = errorCode(error);
    if (code === undefined || !REFUSALS.has(code)) return false;
    this.mode = 'plain';
    this.logger.warn(
      `PostgreSQL refused a prepared statement (${code}); running the store's statements unprepared from now on.`,
    );
    return true;
  }
}

function errorCode(error: unknown): string | undefined {
  const code =
    (error as { code?: unknown } | null)?.code ??
    (error as { driverError?: { code?: unknown } } | null)?.driverError?.code;
  return typeof code === 'string' ? code : undefined;
}

/**
 * A value as a PostgreSQL literal for `EXECUTE`, whose arguments cannot be bind parameters. Quoted
 * text is coerced to the prepared statement's parameter type, as a bind parameter would be. An
 * escape string (E'…') reads backslashes the same whatever `standard_conforming_strings` says, so
 * doubling `\` and `'` is the whole escape. A NUL cannot be in PostgreSQL text, and here it would cut
 * the statement short: refused, as the server refuses it in a bind parameter.
 */
function sqlLiteral(value: unknown): string {
  if (value === null || value === undefined) return 'NULL';
  // The store's statements take only text, numbers and booleans: anything else is the store's bug.
  if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean')
    throw new TypeError(`A value for the idempotency store is a ${typeof value}.`);
  const text = String(value);
  if (text.includes('\0'))
    throw new TypeError('A value for the idempotency store contains a NUL character.');
  return `E'${text.replaceAll('\\', '\\\\').replaceAll("'", "''")}'`;
}

async function ordinary<Row>(
  runner: QueryRunner,
  text: string,
  values: unknown[],
): Promise<StatementResult<Row>> {
  const result = await runner.query(text, values, true);
  return {
    rows: Array.isArray(result.records) ? (result.records as Row[]) : [],
    affected: result.affected ?? 0,
  };
}

function asResult<Row>(result: PgResult): StatementResult<Row> {
  return { rows: result.rows as Row[], affected: result.rowCount ?? 0 };
}
