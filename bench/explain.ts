import type { DataSource } from 'typeorm';
import type { Statement } from './query-counter.js';

/**
 * EXPLAIN (ANALYZE, BUFFERS, WAL) of a statement inside a transaction that is rolled back, after
 * `before` (e.g. the claim a `complete` needs) in the same transaction. ANALYZE runs the statement,
 * so the plan shows real buffers and the WAL it writes; the rollback leaves the table as it was.
 */
export async function explainRolledBack(
  dataSource: DataSource,
  statement: Statement,
  before?: Statement,
): Promise<string> {
  const runner = dataSource.createQueryRunner();
  try {
    await runner.startTransaction();
    if (before) await runner.query(before.query, before.parameters);
    const rows = (await runner.query(
      `EXPLAIN (ANALYZE, BUFFERS, WAL) ${statement.query}`,
      statement.parameters,
    )) as { 'QUERY PLAN': string }[];
    return rows.map((row) => row['QUERY PLAN']).join('\n');
  } finally {
    if (runner.isTransactionActive) await runner.rollbackTransaction();
    await runner.release();
  }
}

/** The one statement a store call sent (the last, if it sent several: the one that decided). */
export function decidingStatement(statements: readonly Statement[], what: string): Statement {
  const statement = statements[statements.length - 1];
  if (!statement) throw new Error(`explain: ${what} sent no statement`);
  return statement;
}

/** The statement with some parameter values swapped (another key, another token, real bounds). */
export function withParameters(
  statement: Statement,
  swaps: ReadonlyMap<unknown, unknown>,
): Statement {
  return {
    query: statement.query,
    parameters: statement.parameters.map((value) => (swaps.has(value) ? swaps.get(value) : value)),
  };
}
