import { PGliteDriver } from 'typeorm-pglite';

type PGlitePoolClass = PGliteDriver['driver']['Pool'];
type ConnectCallback = Parameters<InstanceType<PGlitePoolClass>['connect']>[0];

/**
 * typeorm-pglite's driver, with connections handed out one at a time.
 *
 * PGlite is a single Postgres session, and typeorm-pglite gives that same session to every query
 * runner at once. So while one request runs a transaction, another request's statements land
 * inside it: a ROLLBACK (say, a transfer refused for insufficient funds) silently undoes a payment
 * that was already answered 201, or an idempotency record the library just claimed.
 *
 * Here a query runner waits for the session until the previous one has released it, which is what
 * a pg pool of size one does. TypeORM releases a runner after every standalone query and at the end
 * of every transaction, so the wait is one statement or one transaction long. The one rule it adds:
 * inside `dataSource.transaction(manager => …)` use `manager`, not the DataSource — a second runner
 * would wait for the first forever.
 */
export function exclusivePGliteDriver(dataDir: string): { Pool: PGlitePoolClass } {
  const { Pool } = new PGliteDriver({ dataDir }).driver;

  class ExclusivePGlitePool extends Pool {
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
            done();
            releaseSession();
          });
        }),
      );
    }
  }

  return { Pool: ExclusivePGlitePool };
}
