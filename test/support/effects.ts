import type { DataSource } from 'typeorm';

/**
 * Side-effect tables of the storm server (test/fixtures/storm-server.ts), one pair per test run:
 * `<table>` gets a row per handler execution, `<table>_unique` one row per key (the idempotent
 * write the README recommends for the window between a handler's commit and its stored response).
 */
export async function createEffectsTables(db: DataSource, table: string): Promise<void> {
  await db.query(
    `CREATE TABLE ${table} (id serial PRIMARY KEY, idempotency_key text NOT NULL, route text NOT NULL, pid int NOT NULL, amount int, attempt text, at timestamptz NOT NULL DEFAULT clock_timestamp())`,
  );
  await db.query(
    `CREATE TABLE ${table}_unique (id serial PRIMARY KEY, idempotency_key text NOT NULL UNIQUE, pid int NOT NULL, amount int)`,
  );
}

export async function dropEffectsTables(db: DataSource, table: string): Promise<void> {
  await db.query(`DROP TABLE IF EXISTS ${table}, ${table}_unique`);
}
