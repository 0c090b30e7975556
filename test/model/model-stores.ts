/**
 * The stores the model-based suite runs on: the TypeORM store on every database of
 * support/databases.ts (PGlite and SQLite always, PostgreSQL and MariaDB when their URLs are set,
 * each in a database of its own on the server; not the PgBouncer pools, which the rest of the
 * suite covers) and the Redis store (REDIS_URL, under a prefix of its own).
 * Each gives the module's options and reads or deletes a record straight from the storage.
 */
import { Redis } from 'ioredis';
import { randomBytes } from 'node:crypto';
import { DataSource, type DataSourceOptions } from 'typeorm';
import {
  IdempotencyRecord,
  RedisIdempotencyStore,
  type IdempotencyModuleOptions,
  type RecordId,
} from '../../lib/index.js';
import { testDatabases } from '../support/databases.js';

/** A record as the storage holds it, reduced to what the model predicts. */
export interface StoredRow {
  readonly state: string;
  readonly expiresAt: number;
  readonly status: number | null;
}

export interface ModelStore {
  readonly options: Pick<IdempotencyModuleOptions, 'dataSource' | 'store'>;
  row(id: RecordId): Promise<StoredRow | undefined>;
  /** Deletes the record by hand, as an operator would (README: the replay cache may keep it). */
  forget(id: RecordId): Promise<void>;
  /** Deletes every record whose key starts with `keyPrefix`, then closes. */
  close(keyPrefix: string): Promise<void>;
}

export interface ModelStoreTarget {
  readonly name: string;
  /** Why it is skipped (its URL is unset), or undefined when it runs. */
  readonly skipped?: string;
  open(): Promise<ModelStore>;
}

/**
 * A database of its own on the server of `url` (dropped by `drop`), so the records table is the
 * one this branch's migration creates — not one another spec or worktree created earlier in the
 * shared database — and purging it touches no one else's rows.
 */
async function privateDatabase(type: 'postgres' | 'mariadb', url: string) {
  const name = `model_${randomBytes(6).toString('hex')}`;
  const admin = new DataSource({ type, url });
  await admin.initialize();
  await admin.query(`CREATE DATABASE ${name}`);
  const own = new URL(url);
  own.pathname = `/${name}`;
  return {
    options: { type, url: own.toString() } as DataSourceOptions,
    async drop() {
      try {
        await admin.query(
          type === 'postgres'
            ? `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`
            : `DROP DATABASE IF EXISTS ${name}`,
        );
      } finally {
        await admin.destroy();
      }
    },
  };
}

function typeormTarget(name: string): ModelStoreTarget {
  const database = testDatabases.find((candidate) => candidate.name === name);
  const urls: Record<string, string> = { postgres: 'DATABASE_URL', mariadb: 'MARIADB_URL' };
  return {
    name,
    skipped: database ? undefined : `set ${urls[name]} to run`,
    async open() {
      const server =
        name === 'postgres' || name === 'mariadb'
          ? await privateDatabase(name, process.env[urls[name]]!)
          : undefined;
      const dataSource = new DataSource({
        ...(server?.options ?? database!.options()),
        entities: [IdempotencyRecord],
      });
      await dataSource.initialize();
      const repository = dataSource.getRepository(IdempotencyRecord);
      return {
        options: { dataSource },
        async row(id) {
          const row = await repository.findOneBy({
            scope: id.scope,
            endpoint: id.endpoint,
            key: id.key,
          });
          return row
            ? { state: row.state, expiresAt: row.expiresAt, status: row.responseStatus }
            : undefined;
        },
        async forget(id) {
          await repository.delete({ scope: id.scope, endpoint: id.endpoint, key: id.key });
        },
        async close(keyPrefix) {
          try {
            if (dataSource.isInitialized) {
              await dataSource
                .createQueryBuilder()
                .delete()
                .from(IdempotencyRecord)
                .where('idempotency_key LIKE :prefix', { prefix: `${keyPrefix}%` })
                .execute();
            }
          } finally {
            if (dataSource.isInitialized) await dataSource.destroy();
            await server?.drop();
          }
        },
      };
    },
  };
}

function redisTarget(): ModelStoreTarget {
  const url = process.env.REDIS_URL;
  return {
    name: 'redis',
    skipped: url ? undefined : 'set REDIS_URL to run',
    async open() {
      const prefix = `model-${process.pid}-${Date.now()}:`;
      const redis = new Redis(url!, { enableOfflineQueue: false, maxRetriesPerRequest: 0 });
      await new Promise<void>((resolve, reject) => {
        redis.once('ready', resolve);
        redis.once('error', reject);
      });
      const store = new RedisIdempotencyStore(redis, { prefix });
      // The store's own naming of a record's hash (RedisIdempotencyStore.keyOf).
      const keyOf = (id: RecordId) => `${prefix}${JSON.stringify([id.scope, id.endpoint, id.key])}`;
      return {
        options: { store },
        async row(id) {
          const hash = await redis.hgetall(keyOf(id));
          if (!hash.s) return undefined;
          return {
            state: hash.s,
            expiresAt: Number(hash.x),
            status: hash.c === undefined || hash.c === '' ? null : Number(hash.c),
          };
        },
        async forget(id) {
          await redis.del(keyOf(id));
        },
        async close() {
          try {
            let cursor = '0';
            do {
              const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 500);
              if (keys.length > 0) await redis.del(...keys);
              cursor = next;
            } while (cursor !== '0');
          } finally {
            redis.disconnect();
          }
        },
      };
    },
  };
}

/** Every store, those whose server is not configured marked `skipped`. */
export const modelStores: readonly ModelStoreTarget[] = [
  typeormTarget('pglite'),
  typeormTarget('sqlite'),
  typeormTarget('postgres'),
  typeormTarget('mariadb'),
  redisTarget(),
];
