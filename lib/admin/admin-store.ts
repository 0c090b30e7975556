import { existsSync } from 'node:fs';
import { DataSource, DefaultNamingStrategy, type DataSourceOptions } from 'typeorm';
import type { IdempotencyStore } from '../storage/idempotency-store.interface.js';
import {
  RedisIdempotencyStore,
  type RedisClient,
} from '../storage/redis/redis-idempotency.store.js';
import {
  IDEMPOTENCY_RECORDS_TABLE,
  IdempotencyRecord,
} from '../storage/typeorm/idempotency-record.entity.js';
import { pgliteDriver } from '../storage/typeorm/pglite-driver.js';
import { TypeOrmIdempotencyStore } from '../storage/typeorm/typeorm-idempotency.store.js';

/** A store opened by the admin CLI, and how to close what it opened. */
export interface AdminStoreConnection {
  readonly store: IdempotencyStore;
  close(): Promise<void>;
}

/** Where the records are, beyond the URL. */
export interface AdminStoreOptions {
  /** The records table, when the app renamed it (default `idempotency_records`). */
  readonly table?: string;
  /** Its PostgreSQL schema. */
  readonly schema?: string;
  /** The Redis store's key prefix (default `idempotency:`). */
  readonly prefix?: string;
}

/**
 * Opens the store a URL names: `postgres://` / `postgresql://`, `mysql://` / `mariadb://`,
 * `sqlite:<file>`, `pglite:<data dir>` (of a stopped app: PGlite is one process's), `redis://` /
 * `rediss://` (through ioredis, an optional peer). Nothing is migrated: the table must exist.
 */
export async function openAdminStore(
  url: string,
  options: AdminStoreOptions = {},
): Promise<AdminStoreConnection> {
  const scheme = /^([a-z0-9+]+):/i.exec(url)?.[1]?.toLowerCase();
  if (scheme === 'redis' || scheme === 'rediss') return openRedis(url, options);
  const common = {
    entities: [IdempotencyRecord],
    namingStrategy: new RecordsTableNaming(options.table),
  };
  let dataSourceOptions: DataSourceOptions;
  switch (scheme) {
    case 'postgres':
    case 'postgresql':
      dataSourceOptions = {
        type: 'postgres',
        url,
        schema: options.schema,
        applicationName: 'nestjs-idempotency-admin',
        extra: { max: 2 },
        ...common,
      };
      break;
    case 'mysql':
    case 'mariadb':
      dataSourceOptions = { type: scheme, url, ...common };
      break;
    case 'sqlite':
      dataSourceOptions = {
        type: 'better-sqlite3',
        database: existingPath(url.slice('sqlite:'.length), 'database file'),
        ...common,
      };
      break;
    case 'pglite':
      dataSourceOptions = {
        type: 'postgres',
        driver: pgliteDriver({
          dataDir: existingPath(url.slice('pglite:'.length), 'data directory'),
        }),
        ...common,
      };
      break;
    default:
      throw new Error(
        'the URL must start with postgres://, mysql://, mariadb://, sqlite:, pglite:, redis:// or rediss://',
      );
  }
  const dataSource = new DataSource(dataSourceOptions);
  await dataSource.initialize();
  const store = new TypeOrmIdempotencyStore(dataSource, {
    waitNotifications: false,
    batchStatements: false,
  });
  return {
    store,
    close: async () => {
      await store.close();
      await dataSource.destroy();
    },
  };
}

async function openRedis(url: string, options: AdminStoreOptions): Promise<AdminStoreConnection> {
  let ioredis: { Redis?: RedisConstructor; default?: RedisConstructor };
  // An optional peer: named through a variable, so only a Redis URL needs it installed.
  const optionalPeer = 'ioredis';
  try {
    ioredis = (await import(optionalPeer)) as typeof ioredis;
  } catch {
    throw new Error('a redis:// URL needs the ioredis package (npm install ioredis)');
  }
  const Redis = (ioredis.Redis ?? ioredis.default)!;
  // One attempt: an operator's command fails fast on a wrong or unreachable URL instead of
  // reconnecting for ever (and printing each failure's stack trace).
  const client = new Redis(url, {
    lazyConnect: true,
    maxRetriesPerRequest: 1,
    retryStrategy: () => null,
  });
  let failure: Error | undefined;
  client.on('error', (error: Error) => (failure ??= error));
  try {
    await client.connect();
  } catch (error) {
    client.disconnect();
    throw failure ?? error;
  }
  const store = new RedisIdempotencyStore(client, { prefix: options.prefix });
  return {
    store,
    close: async () => {
      await store.close();
      await client.quit();
    },
  };
}

type RedisConstructor = new (
  url: string,
  options: object,
) => RedisClient & {
  connect(): Promise<unknown>;
  quit(): Promise<unknown>;
  disconnect(): void;
  on(event: 'error', listener: (error: Error) => void): unknown;
};

/**
 * The path of a `sqlite:` or `pglite:` URL, if something is there: SQLite and PGlite would create
 * an empty database at a mistyped path, and the command would fail on a missing table.
 */
function existingPath(path: string, what: string): string {
  if (path !== ':memory:' && path !== '' && !existsSync(path))
    throw new Error(`no ${what} at ${path}: it does not exist`);
  return path;
}

/** The records table under the name an app gave it (`--table`). */
class RecordsTableNaming extends DefaultNamingStrategy {
  constructor(private readonly table: string | undefined) {
    super();
  }

  override tableName(targetName: string, userSpecifiedName: string | undefined): string {
    return this.table && userSpecifiedName === IDEMPOTENCY_RECORDS_TABLE
      ? this.table
      : super.tableName(targetName, userSpecifiedName);
  }
}
