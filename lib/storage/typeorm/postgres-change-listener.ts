import { Logger } from '@nestjs/common';
import { createHash } from 'node:crypto';
import type { DataSource } from 'typeorm';
import type { RecordId, RecordWatch } from '../idempotency-store.interface.js';
import { RecordWatches } from '../record-watches.js';

/**
 * The NOTIFY channel of every records table: the payload (`changeTag`) says which record of which
 * table changed, so one channel serves several tables or apps in a database.
 */
export const CHANGE_CHANNEL = 'nestjs_idempotency';

/**
 * The NOTIFY payload of a record: a SHA-256 of its table and id, so the key never travels in clear
 * (any session of the database can LISTEN). 32 hex characters; a collision only wakes a waiter for
 * nothing, and the waiter re-reads anyway.
 */
export function changeTag(table: string, { scope, endpoint, key }: RecordId): string {
  return createHash('sha256')
    .update(JSON.stringify([table, scope, endpoint, key]))
    .digest('hex')
    .slice(0, 32);
}

/** First delay before reconnecting after a loss, doubled per failed attempt up to the maximum. */
const RECONNECT_FIRST_DELAY_MS = 100;
const RECONNECT_MAX_DELAY_MS = 5_000;
/** A connect + LISTEN that has not finished by then is abandoned and tried again. */
const CONNECT_TIMEOUT_MS = 10_000;
/** TCP keep-alive on the idle listening socket, so a silently dropped connection is noticed. */
const KEEP_ALIVE_DELAY_MS = 10_000;

/** What this class needs of a `pg` Client (pg and pg-native both have it). */
interface ListeningClient {
  connect(): Promise<unknown>;
  query(sql: string): Promise<unknown>;
  end(): Promise<unknown>;
  on(
    event: 'notification',
    listener: (message: { channel: string; payload?: string }) => void,
  ): unknown;
  on(event: 'error' | 'end', listener: (error?: Error) => void): unknown;
}
type ClientConstructor = new (options: object) => ListeningClient;

/** TypeORM's PostgresDriver internals used here: the loaded `pg` module and the master pool. */
interface PgDriverInternals {
  postgres?: { Client?: ClientConstructor };
  master?: { options?: Record<string, unknown> & { password?: unknown } };
}

/**
 * One LISTEN connection per store (so per process, not per request), opened on the first watch
 * and kept for the life of the store: notifications of completed or released records wake the
 * watches of those records.
 *
 * The connection is a `pg` Client of its own, built from the options of the DataSource's pool (same
 * server, credentials, SSL, application_name) but outside it: it never takes a query connection
 * away from the app. If it is lost it is reopened with backoff; meanwhile every watch reports
 * `live: false`, so waiters poll. Each change of `live` wakes every watch, so waiters re-read at
 * once: nothing that happened while nobody listened goes unseen.
 */
export class PostgresChangeListener {
  private readonly logger = new Logger('Idempotency');
  private readonly watches = new RecordWatches(() => this.listening);
  private client: ListeningClient | null = null;
  private listening = false;
  private connecting = false;
  private closed = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private reconnectDelayMs = RECONNECT_FIRST_DELAY_MS;
  /** Set after a loss, so its recovery is logged once. */
  private lostSince: number | undefined;

  private constructor(
    private readonly dataSource: DataSource,
    private readonly Client: ClientConstructor,
  ) {}

  /**
   * A listener for a PostgreSQL DataSource whose driver is `pg` (or pg-native); `null` when the
   * driver cannot open a connection of its own — PGlite through typeorm-pglite is one shared
   * session with no notification events, so waiters there poll.
   */
  static forDataSource(dataSource: DataSource): PostgresChangeListener | null {
    const Client = (dataSource.driver as unknown as PgDriverInternals).postgres?.Client;
    return typeof Client === 'function' ? new PostgresChangeListener(dataSource, Client) : null;
  }

  watch(tag: string): RecordWatch {
    const watch = this.watches.watch(tag);
    if (!this.client && !this.connecting && this.reconnectTimer === undefined) void this.connect();
    return watch;
  }

  /** Stops listening for good and closes the connection; watches report `live: false`. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    const client = this.client;
    this.detach();
    if (client) await client.end().catch(() => undefined);
  }

  private async connect(): Promise<void> {
    if (this.closed || !this.dataSource.isInitialized) return;
    this.connecting = true;
    let client: ListeningClient | undefined;
    let timer: NodeJS.Timeout | undefined;
    try {
      client = this.openClient();
      await Promise.race([
        client.connect().then(() => client!.query(`LISTEN ${CHANGE_CHANNEL}`)),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`no answer within ${CONNECT_TIMEOUT_MS} ms`)),
            CONNECT_TIMEOUT_MS,
          );
        }),
      ]);
    } catch (error) {
      this.connecting = false;
      client?.end().catch(() => undefined);
      if (this.lostSince === undefined) {
        this.lostSince = Date.now();
        this.logger.warn(
          `Could not open the LISTEN connection for waiting duplicates (${(error as Error).message}); they poll every waitPollInterval until it is open. Retrying.`,
        );
      }
      this.scheduleReconnect();
      return;
    } finally {
      clearTimeout(timer);
    }
    this.connecting = false;
    if (this.closed) {
      await client.end().catch(() => undefined);
      return;
    }
    this.client = client;
    this.listening = true;
    this.reconnectDelayMs = RECONNECT_FIRST_DELAY_MS;
    if (this.lostSince !== undefined) {
      this.logger.log(
        `The LISTEN connection for waiting duplicates is back after ${Date.now() - this.lostSince} ms.`,
      );
      this.lostSince = undefined;
    }
    this.wakeAll();
  }

  /**
   * A client with the options the DataSource's pool gives its own (pg-pool keeps the password as a
   * non-enumerable property, which a spread would drop), and TCP keep-alive on.
   */
  private openClient(): ListeningClient {
    const options = (this.dataSource.driver as unknown as PgDriverInternals).master?.options;
    if (!options) throw new Error('the PostgreSQL driver has no connection pool');
    const client = new this.Client({
      ...options,
      password: options.password,
      keepAlive: true,
      keepAliveInitialDelayMillis: KEEP_ALIVE_DELAY_MS,
    });
    client.on('notification', ({ channel, payload }) => {
      if (channel === CHANGE_CHANNEL && payload) this.watches.wake(payload);
    });
    client.on('error', (error) => this.lost(client, error));
    client.on('end', () => this.lost(client));
    return client;
  }

  /** The connection ended or failed: waiters poll until a new one listens. */
  private lost(client: ListeningClient, error?: Error) {
    if (client !== this.client) return;
    this.detach();
    client.end().catch(() => undefined);
    if (this.closed) return;
    this.lostSince = Date.now();
    this.logger.warn(
      `Lost the LISTEN connection for waiting duplicates${error ? ` (${error.message})` : ''}; they poll every waitPollInterval until it is back. Reconnecting.`,
    );
    this.scheduleReconnect();
  }

  private detach() {
    const wasListening = this.listening;
    this.client = null;
    this.listening = false;
    if (wasListening) this.wakeAll();
  }

  private scheduleReconnect() {
    if (this.closed || this.reconnectTimer !== undefined) return;
    const delayMs = this.reconnectDelayMs;
    this.reconnectDelayMs = Math.min(delayMs * 2, RECONNECT_MAX_DELAY_MS);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.connect();
    }, delayMs);
    // Reconnecting must not keep a process alive that has nothing else to do.
    this.reconnectTimer.unref();
  }

  private wakeAll() {
    this.watches.wakeAll();
  }
}
