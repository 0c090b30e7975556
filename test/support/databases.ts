import type { DataSourceOptions } from 'typeorm';
import { randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pgliteDriver } from '../../lib/index.js';

/** A database the e2e suite runs on. */
export interface TestDatabase {
  readonly name: string;
  /** Options for a fresh connection; PGlite gives a new in-memory database each time. */
  options(): DataSourceOptions;
  /**
   * Several processes can share it and the multi-process fixtures (which speak PostgreSQL's SQL
   * for their side-effect tables) run on it.
   */
  readonly shared: boolean;
  /**
   * Each connection gets a database of its own, so no other spec's rows — or purges — are in its
   * records table: only there can a test count what one purge deleted.
   */
  readonly ownTablePerConnection: boolean;
  /** Transactional routes run on it (all but SQLite, whose TypeORM driver shares one connection). */
  readonly transactions: boolean;
  /** PostgreSQL through PgBouncer, in this pooling mode. */
  readonly pooler?: 'transaction' | 'session';
}

const pglite: TestDatabase = {
  name: 'pglite',
  shared: false,
  ownTablePerConnection: true,
  transactions: true,
  // The library's driver, as in the module's default store: one query runner at a time.
  options: () => ({ type: 'postgres', driver: pgliteDriver() }),
};

/** PostgreSQL when DATABASE_URL is set (postgres://user@host:port/db). */
function postgresFromEnv(): TestDatabase[] {
  const url = process.env.DATABASE_URL;
  if (!url) return [];
  return [
    {
      name: 'postgres',
      shared: true,
      ownTablePerConnection: false,
      transactions: true,
      options: () => ({ type: 'postgres', url }),
    },
  ];
}

/**
 * PostgreSQL through PgBouncer when `.ci/start-pgbouncer`'s URLs are set: in transaction pooling
 * (each transaction may get another server connection: no session state, prepared statements or
 * LISTEN carry over) and in session pooling. The whole e2e suite runs through each.
 */
function pgbouncerFromEnv(): TestDatabase[] {
  const pools = [
    ['pgbouncer-transaction', 'transaction', process.env.PGBOUNCER_TRANSACTION_URL],
    ['pgbouncer-session', 'session', process.env.PGBOUNCER_SESSION_URL],
  ] as const;
  return pools.flatMap(([name, pooler, url]) =>
    url
      ? [
          {
            name,
            pooler,
            shared: true,
            ownTablePerConnection: false,
            transactions: true,
            options: () => ({ type: 'postgres' as const, url }),
          },
        ]
      : [],
  );
}

/** SQLite through better-sqlite3: a new file per connection, so no server is needed. */
const sqlite: TestDatabase = {
  name: 'sqlite',
  shared: false,
  ownTablePerConnection: true,
  transactions: false,
  options: () => ({
    type: 'better-sqlite3',
    database: join(tmpdir(), `nestjs-idempotency-${randomUUID()}.sqlite`),
  }),
};

/** MariaDB/MySQL when MARIADB_URL is set (mysql://user@host:port/db). */
function mariadbFromEnv(): TestDatabase[] {
  const url = process.env.MARIADB_URL;
  if (!url) return [];
  return [
    {
      name: 'mariadb',
      shared: false,
      ownTablePerConnection: false,
      transactions: true,
      options: () => ({ type: 'mariadb', url }),
    },
  ];
}

/**
 * TEST_DATABASES=pglite,postgres keeps only the databases named (the Node matrix of
 * `.ci/node-matrix` runs without SQLite: better-sqlite3's addon is built for the main Node only).
 */
const only = process.env.TEST_DATABASES?.split(',').map((name) => name.trim());

/**
 * Every database configured for this run: the embedded ones (PGlite, SQLite) always, the servers
 * when their variables are set (DATABASE_URL for PostgreSQL, MARIADB_URL for MariaDB), all narrowed
 * to TEST_DATABASES when it is set.
 */
export const testDatabases: readonly TestDatabase[] = [
  pglite,
  sqlite,
  ...postgresFromEnv(),
  ...mariadbFromEnv(),
  ...pgbouncerFromEnv(),
].filter((database) => !only || only.includes(database.name));

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
