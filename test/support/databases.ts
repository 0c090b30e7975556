import type { DataSourceOptions } from 'typeorm';
import { PGliteDriver } from 'typeorm-pglite';

/** A database the e2e suite runs on. */
export interface TestDatabase {
  readonly name: string;
  /** Options for a fresh connection; PGlite gives a new in-memory database each time. */
  options(): DataSourceOptions;
  /** Several processes can share it (a server, not an embedded database). */
  readonly shared: boolean;
}

const pglite: TestDatabase = {
  name: 'pglite',
  shared: false,
  options: () => ({ type: 'postgres', driver: new PGliteDriver().driver }),
};

/** PostgreSQL when DATABASE_URL is set (postgres://user@host:port/db). */
function postgresFromEnv(): TestDatabase[] {
  const url = process.env.DATABASE_URL;
  if (!url) return [];
  return [{ name: 'postgres', shared: true, options: () => ({ type: 'postgres', url }) }];
}

/** Every database configured for this run: PGlite always, the others when their variables are set. */
export const testDatabases: readonly TestDatabase[] = [pglite, ...postgresFromEnv()];

/** The same, as `describe.each` rows. */
export const eachDatabase = testDatabases.map((database) => [database.name, database] as const);

/** The HTTP platforms the e2e suite runs on. */
export type HttpPlatform = 'express' | 'fastify';

/** What one e2e run targets: a database and an HTTP platform. */
export interface TestTarget {
  readonly database: TestDatabase;
  readonly platform: HttpPlatform;
}

/** Every database × both platforms, as `describe.each` rows labelled `postgres/fastify`. */
export const eachTarget = testDatabases.flatMap((database) =>
  (['express', 'fastify'] as const).map(
    (platform) => [`${database.name}/${platform}`, { database, platform }] as const,
  ),
);
