import { PGliteDriver } from 'typeorm-pglite';

type PGlitePoolClass = PGliteDriver['driver']['Pool'];
type ConnectCallback = Parameters<InstanceType<PGlitePoolClass>['connect']>[0];

/** Marks the pools made here, so the store can tell a PGlite DataSource that is safe for transactions. */
const ONE_RUNNER_AT_A_TIME = Symbol.for('nestjs-idempotency.pglite-one-runner-at-a-time');

/** Options of {@link pgliteDriver}. */
export interface PGliteDriverOptions {
  /**
   * Where PGlite keeps its files; a folder path, or `memory://…`.
   * @default in memory (nothing survives the process)
   */
  readonly dataDir?: string;
}

/**
 * typeorm-pglite's driver, with its one session handed to one query runner at a time: pass it as
 * `driver` in `{ type: 'postgres', driver: pgliteDriver({ dataDir }) }`. The module's default
 * store uses it.
 *
 * PGlite is a single Postgres session, and typeorm-pglite gives that same session to every query
 * runner at once. So while one request runs a transaction, another request's statements land inside
 * it: a ROLLBACK silently undoes a claim or a write that was already answered. Here a query runner
 * waits for the session until the previous one has released it, which is what a pg pool of size one
 * does. TypeORM releases a runner after every standalone query and at the end of every transaction,
 * so the wait is one statement or one transaction long. The one rule it adds: inside a transaction
 * (`dataSource.transaction(manager => …)`, or a `transactional` idempotent route) write through its
 * `manager`, not the DataSource — a second runner would wait for the first forever.
 */
export function pgliteDriver(options: PGliteDriverOptions = {}): {
  /** The pool class TypeORM's postgres driver instantiates: one session, one runner at a time. */
  Pool: PGlitePoolClass;
} {
  const { Pool } = new PGliteDriver(
    options.dataDir === undefined ? {} : { dataDir: options.dataDir },
  ).driver;

  class OneRunnerAtATimePool extends Pool {
    static readonly [ONE_RUNNER_AT_A_TIME] = true;
    /** Settles when the runner holding the session releases it. */
    private sessionFree: Promise<void> = Promise.resolve();

    override connect(callback: ConnectCallback): Promise<void> {
      const previousHolder = this.sessionFree;
      let releaseSession!: () => void;
      this.sessionFree = new Promise<void>((resolve) => (releaseSession = resolve));
      return previousHolder.then(() =>
        super.connect((error, client, done) => {
          if (error) {
            releaseSession();
            return callback(error, client, done);
          }
          let released = false;
          callback(null, client, () => {
            if (released) return;
            released = true;
            // typeorm-pglite types `done` as `Function`; it takes no arguments.
            (done as () => void)();
            releaseSession();
          });
        }),
      );
    }
  }

  return { Pool: OneRunnerAtATimePool };
}

/** Whether `driver` (a DataSource's `options.driver`) is one made by {@link pgliteDriver}. */
export function isOneRunnerAtATime(driver: unknown): boolean {
  const pool = (driver as { Pool?: Record<symbol, unknown> } | undefined)?.Pool;
  return pool?.[ONE_RUNNER_AT_A_TIME] === true;
}
