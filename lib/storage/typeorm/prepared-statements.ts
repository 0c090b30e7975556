import { Logger } from '@nestjs/common';
import type { DataSource, QueryRunner } from 'typeorm';

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
 * Runs the store's per-request statements on PostgreSQL as named prepared statements of the `pg`
 * driver: the server parses and plans each once per connection instead of on every request — for
 * the claim, planning costs more than executing (see bench/results.md). Statements still go through
 * TypeORM's pool and are reported to its logger. Elsewhere (PGlite and other custom drivers, MySQL,
 * SQLite) they run as ordinary statements through TypeORM, and so they do here after the server
 * refused a prepared statement once.
 */
export class PreparedStatements {
  private readonly logger = new Logger('Idempotency');
  private named: boolean;

  constructor(private readonly dataSource: DataSource) {
    // A `driver` option replaces `pg` (typeorm-pglite does): its client may not take query configs.
    const options = dataSource.options as { type: string; driver?: unknown };
    this.named = options.type === 'postgres' && options.driver === undefined;
  }

  /** Runs `text` with `values`; `name` identifies the statement, one name per distinct text. */
  async run<Row>(name: string, text: string, values: unknown[]): Promise<StatementResult<Row>> {
    const runner = this.dataSource.createQueryRunner();
    try {
      return this.named ? await this.runNamed<Row>(runner, name, text, values) : await ordinary<Row>(runner, text, values);
    } finally {
      await runner.release();
    }
  }

  private async runNamed<Row>(runner: QueryRunner, name: string, text: string, values: unknown[]) {
    const client = (await runner.connect()) as PgClient;
    this.dataSource.logger.logQuery(text, values, runner);
    try {
      return asResult<Row>(await client.query({ name: `nestjs_idempotency_${name}`, text, values }));
    } catch (error) {
      const code = (error as { code?: unknown }).code;
      if (typeof code !== 'string' || !REFUSALS.has(code)) throw error;
      this.named = false;
      this.logger.warn(
        `PostgreSQL refused a prepared statement (${code}); running the store's statements unprepared from now on.`,
      );
      return asResult<Row>(await client.query(text, values));
    }
  }
}

async function ordinary<Row>(runner: QueryRunner, text: string, values: unknown[]): Promise<StatementResult<Row>> {
  const result = await runner.query(text, values, true);
  return { rows: Array.isArray(result.records) ? (result.records as Row[]) : [], affected: result.affected ?? 0 };
}

function asResult<Row>(result: PgResult): StatementResult<Row> {
  return { rows: result.rows as Row[], affected: result.rowCount ?? 0 };
}
