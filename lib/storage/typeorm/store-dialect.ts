import type { DataSource } from 'typeorm';
import type { ClaimRequest, ClaimResult } from '../idempotency-store.interface.js';

/** The statements whose best form differs between databases; everything else is QueryBuilder. */
export interface StoreDialect {
  claim(request: ClaimRequest): Promise<ClaimResult>;
  purgeExpired(now: number, limit: number): Promise<number>;
}

/** The escaped, schema-qualified table name of the entity in this DataSource. */
export function qualifiedTable(dataSource: DataSource, tablePath: string): string {
  return tablePath
    .split('.')
    .map((part) => dataSource.driver.escape(part))
    .join('.');
}

/** Runs a statement and returns how many rows it changed (needs a QueryRunner's structured result). */
export async function affectedRows(
  dataSource: DataSource,
  sql: string,
  parameters: unknown[],
): Promise<number> {
  const runner = dataSource.createQueryRunner();
  try {
    const { affected } = await runner.query(sql, parameters, true);
    return affected ?? 0;
  } finally {
    await runner.release();
  }
}
