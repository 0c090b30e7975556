import { randomUUID } from 'node:crypto';
import type { DataSource } from 'typeorm';

/**
 * Connections of the store's own beside the DataSource's pool (PostgreSQL through `pg`): the
 * LISTEN connection of waiting duplicates, and the check of whether the pool's sessions last.
 */

/** How long a probe NOTIFY may take to come back to a listening session. */
const PROBE_TIMEOUT_MS = 5_000;

/** What the store needs of a `pg` Client of its own (pg and pg-native both have it). */
export interface ListeningClient {
  connect(): Promise<unknown>;
  query(sql: string): Promise<unknown>;
  end(): Promise<unknown>;
  on(
    event: 'notification',
    listener: (message: { channel: string; payload?: string }) => void,
  ): unknown;
  on(event: 'error' | 'end', listener: (error?: Error) => void): unknown;
}
export type ClientConstructor = new (options: object) => ListeningClient;

/** TypeORM's PostgresDriver internals used here: the loaded `pg` module and the master pool. */
interface PgDriverInternals {
  postgres?: { Client?: ClientConstructor };
  master?: { options?: Record<string, unknown> & { password?: unknown } };
}

/** The `pg` Client class TypeORM loaded; `undefined` when the driver is not `pg` (PGlite). */
export function pgClientClass(dataSource: DataSource): ClientConstructor | undefined {
  const Client = (dataSource.driver as unknown as PgDriverInternals).postgres?.Client;
  return typeof Client === 'function' ? Client : undefined;
}

/**
 * The options the DataSource's pool gives its own connections, for a `pg` Client of ours: pg-pool
 * keeps the password as a non-enumerable property, which a spread would drop. `undefined` when the
 * driver has no pool of `pg` connections (PGlite).
 */
export function pgPoolOptions(dataSource: DataSource): Record<string, unknown> | undefined {
  const options = (dataSource.driver as unknown as PgDriverInternals).master?.options;
  return options && { ...options, password: options.password };
}

/**
 * Sends `payload` on `channel` with a NOTIFY through the DataSource's pool, and resolves whether it
 * came back to a listening session within PROBE_TIMEOUT_MS. `expect` arranges for `arrived` to be
 * called when that session receives `payload`, and returns how to stop expecting it.
 */
export async function notificationArrives(
  dataSource: DataSource,
  channel: string,
  payload: string,
  expect: (payload: string, arrived: () => void) => () => void,
): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  let stop: (() => void) | undefined;
  const arrived = new Promise<boolean>((resolve) => {
    stop = expect(payload, () => resolve(true));
    timer = setTimeout(() => resolve(false), PROBE_TIMEOUT_MS);
  });
  try {
    await dataSource.query('SELECT pg_notify($1, $2)', [channel, payload]);
    return await arrived;
  } finally {
    clearTimeout(timer);
    stop?.();
  }
}

/**
 * Whether a session opened with this DataSource's connection settings persists between
 * statements: false behind a pooler in transaction mode (PgBouncer), where each transaction may
 * get another server connection. Told by a LISTEN on a connection of its own and a NOTIFY sent
 * through the pool: the notification reaches the listening session only if it still exists.
 * Rejects when the database cannot be reached (nothing is known then).
 */
export async function sessionsPersist(dataSource: DataSource): Promise<boolean> {
  const Client = pgClientClass(dataSource);
  const options = pgPoolOptions(dataSource);
  if (!Client || !options) return true;
  const channel = `nestjs_idempotency_probe_${randomUUID().replaceAll('-', '')}`;
  const client = new Client(options);
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query(`LISTEN ${channel}`);
    return await notificationArrives(dataSource, channel, randomUUID(), (payload, arrived) => {
      client.on('notification', (message) => {
        if (message.channel === channel && message.payload === payload) arrived();
      });
      return () => undefined;
    });
  } finally {
    await client.end().catch(() => undefined);
  }
}
