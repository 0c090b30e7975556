import { hash, randomUUID } from 'node:crypto';
import type { DataSource } from 'typeorm';
import type { RecordId, RecordWatch } from '../idempotency-store.interface.js';
import { RecordWatches } from '../record-watches.js';
import {
  notificationArrives,
  pgClientClass,
  pgPoolOptions,
  type ClientConstructor,
  type ListeningClient,
} from './pg-connections.js';
import { quietLogger } from '../../utils/quiet-logger.js';

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
  return hash('sha256', JSON.stringify([table, scope, endpoint, key])).slice(0, 32);
}

/** First delay before reconnecting after a loss, doubled per failed attempt up to the maximum. */
const RECONNECT_FIRST_DELAY_MS = 100;
const RECONNECT_MAX_DELAY_MS = 5_000;
/** A connect + LISTEN that has not finished by then is abandoned and tried again. */
const CONNECT_TIMEOUT_MS = 10_000;
/** TCP keep-alive on the idle listening socket, so a silently dropped connection is noticed. */
const KEEP_ALIVE_DELAY_MS = 10_000;
/** After a probe that never came back, the next attempt (a transaction pooler stays one). */
const PROBE_RETRY_MS = 60_000;
/** Probe payloads start with this; a record's payload is 32 hex characters, so never does. */
const PROBE_PREFIX = 'probe:';
/**
 * An operator deleted the record of the tag that follows (`IdempotencyAdmin`): replay caches drop
 * it. Older versions take it for a tag no watch has, and ignore it.
 */
export const INVALIDATION_PREFIX = 'forget:';

/** Options of the LISTEN connection. */
export interface ChangeListenerOptions {
  /**
   * A connection string for the LISTEN connection alone, straight to PostgreSQL (or through a
   * pooler in session mode), for a DataSource that goes through a pooler in transaction mode,
   * where a LISTEN does not hold. Default: the DataSource pool's own options.
   */
  readonly url?: string;
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
  private readonly logger = quietLogger('Idempotency');
  private readonly watches = new RecordWatches(() => this.listening);
  /**
   * Called with the tag of each record an operator deleted, or `null`: anything may have been
   * (`listening` false: the connection was lost, nothing is heard until it is back).
   */
  private readonly invalidationListeners = new Set<
    (tag: string | null, listening: boolean) => void
  >();
  private client: ListeningClient | null = null;
  private listening = false;
  private connecting = false;
  private closed = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private reconnectDelayMs = RECONNECT_FIRST_DELAY_MS;
  /** Set after a loss, so its recovery is logged once. */
  private lostSince: number | undefined;

  /** The probe NOTIFY a new connection waits for, with what to call when it arrives. */
  private probe: { readonly payload: string; readonly arrived: () => void } | undefined;
  /** Set once a probe never came back, so that is logged once. */
  private probeFailedSince: number | undefined;

  private constructor(
    private readonly dataSource: DataSource,
    private readonly Client: ClientConstructor,
    private readonly options: ChangeListenerOptions,
  ) {}

  /**
   * A listener for a PostgreSQL DataSource whose driver is `pg` (or pg-native); `null` when the
   * driver cannot open a connection of its own — PGlite through typeorm-pglite is one shared
   * session with no notification events, so waiters there poll.
   */
  static forDataSource(
    dataSource: DataSource,
    options: ChangeListenerOptions = {},
  ): PostgresChangeListener | null {
    const Client = pgClientClass(dataSource);
    return Client ? new PostgresChangeListener(dataSource, Client, options) : null;
  }

  watch(tag: string): RecordWatch {
    const watch = this.watches.watch(tag);
    if (!this.client && !this.connecting && this.reconnectTimer === undefined) void this.connect();
    return watch;
  }

  /**
   * Calls `listener` with the change tag of each record an operator deleted (an
   * `INVALIDATION_PREFIX` payload), with `null` each time the connection starts listening (what
   * was deleted while nobody listened is unknown), and with `null` and `listening: false` when it
   * is lost. Opens the connection now; if it is already listening (a waiter opened it), calls
   * `listener` with `null` at once (in a microtask, once the caller's code has run): it heard
   * nothing before. Returns how to stop.
   */
  onInvalidated(listener: (tag: string | null, listening: boolean) => void): () => void {
    this.invalidationListeners.add(listener);
    if (this.listening) {
      queueMicrotask(() => {
        if (this.listening && this.invalidationListeners.has(listener)) listener(null, true);
      });
    } else if (!this.client && !this.connecting && this.reconnectTimer === undefined) {
      void this.connect();
    }
    return () => this.invalidationListeners.delete(listener);
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
    if (this.closed) {
      this.connecting = false;
      await client.end().catch(() => undefined);
      return;
    }
    // Behind a pooler in transaction mode the LISTEN ran on a server connection that went back to
    // the pool: notifications go to whichever client holds it next, never to this one. A NOTIFY
    // sent through the DataSource's own pool tells: it comes back here only if this session is
    // really listening.
    let arrives: boolean;
    try {
      arrives = await this.probeArrives();
    } catch (error) {
      this.connecting = false;
      client.end().catch(() => undefined);
      this.lostSince ??= Date.now();
      this.logger.warn(
        `Could not check the LISTEN connection for waiting duplicates (${(error as Error).message}); they poll every waitPollInterval. Retrying.`,
      );
      this.scheduleReconnect();
      return;
    }
    this.connecting = false;
    if (!arrives) {
      client.end().catch(() => undefined);
      if (this.probeFailedSince === undefined) {
        this.probeFailedSince = Date.now();
        this.logger.warn(
          'Notifications sent through the DataSource never reached its LISTEN connection: the DataSource ' +
            'probably goes through a pooler in transaction mode (PgBouncer). Waiting duplicates poll every ' +
            'waitPollInterval instead. To have them woken at once, give the listener a direct connection: ' +
            'the `listenerUrl` option.',
        );
      }
      this.scheduleReconnect(PROBE_RETRY_MS);
      return;
    }
    if (this.closed) {
      await client.end().catch(() => undefined);
      return;
    }
    this.probeFailedSince = undefined;
    this.client = client;
    this.listening = true;
    this.reconnectDelayMs = RECONNECT_FIRST_DELAY_MS;
    if (this.lostSince !== undefined) {
      this.logger.log(
        `The LISTEN connection for waiting duplicates is back after ${Date.now() - this.lostSince} ms.`,
      );
      this.lostSince = undefined;
    }
    this.invalidated(null);
    this.wakeAll();
  }

  private invalidated(tag: string | null, listening = true) {
    for (const listener of this.invalidationListeners) listener(tag, listening);
  }

  /**
   * A client with the options the DataSource's pool gives its own (pg-pool keeps the password as a
   * non-enumerable property, which a spread would drop), and TCP keep-alive on.
   */
  private openClient(): ListeningClient {
    const options = pgPoolOptions(this.dataSource);
    if (!options) throw new Error('the PostgreSQL driver has no connection pool');
    const client = new this.Client({
      ...(this.options.url === undefined
        ? options
        : { connectionString: this.options.url, application_name: options.application_name }),
      keepAlive: true,
      keepAliveInitialDelayMillis: KEEP_ALIVE_DELAY_MS,
    });
    client.on('notification', ({ channel, payload }) => {
      if (channel !== CHANGE_CHANNEL || !payload) return;
      if (payload.startsWith(PROBE_PREFIX)) {
        if (payload === this.probe?.payload) this.probe.arrived();
        return;
      }
      if (payload.startsWith(INVALIDATION_PREFIX)) {
        this.invalidated(payload.slice(INVALIDATION_PREFIX.length));
        return;
      }
      this.watches.wake(payload);
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
    // Deletions are not heard from now on: replay caches must not answer until it listens again.
    this.invalidated(null, false);
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

  /** Sends a probe NOTIFY through the DataSource's pool; whether it reached this connection. */
  private probeArrives(): Promise<boolean> {
    return notificationArrives(
      this.dataSource,
      CHANGE_CHANNEL,
      `${PROBE_PREFIX}${randomUUID()}`,
      (payload, arrived) => {
        this.probe = { payload, arrived };
        return () => (this.probe = undefined);
      },
    );
  }

  private scheduleReconnect(afterMs?: number) {
    if (this.closed || this.reconnectTimer !== undefined) return;
    const delayMs = afterMs ?? this.reconnectDelayMs;
    if (afterMs === undefined) {
      this.reconnectDelayMs = Math.min(delayMs * 2, RECONNECT_MAX_DELAY_MS);
    }
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
