/**
 * Whether an error says the database connection failed or the server cannot take the statement
 * now — as opposed to the statement itself being wrong. What a transactional route answers with
 * 503 (retry): its transaction did not commit, or if its COMMIT was lost in transit, the retry
 * finds the stored response. Looks through TypeORM's `driverError` and `cause`.
 */
export function isConnectionFailure(error: unknown): boolean {
  return findFailure(error, FAILURE_CODES);
}

/**
 * A connection failure that only a database client reports (PostgreSQL's and MySQL's codes, pg's
 * messages), not a bare socket error that any client (an HTTP call to a gateway) could raise: a
 * transaction that met one has lost its connection, whatever a later probe on the pool finds (behind
 * PgBouncer the probe may get a new server connection).
 */
export function isDatabaseConnectionFailure(error: unknown): boolean {
  return findFailure(error, DATABASE_FAILURE_CODES);
}

function findFailure(error: unknown, codes: RegExp): boolean {
  for (let candidate = error, depth = 0; candidate && depth < 4; depth++) {
    const { code, errno, message } = candidate as {
      code?: unknown;
      errno?: unknown;
      message?: unknown;
    };
    if (typeof code === 'string' && codes.test(code)) return true;
    // MariaDB's ER_CONNECTION_KILLED, which mysql2 reports by number only (no `code`).
    if (errno === 1927 && code === undefined) return true;
    if (typeof message === 'string' && FAILURE_MESSAGES.test(message)) return true;
    const next = candidate as { driverError?: unknown; cause?: unknown };
    candidate = next.driverError ?? next.cause;
  }
  return false;
}

/**
 * Node's socket errors; PostgreSQL's class 08 (connection exception), 57P01–57P03 (shut down,
 * crashed, not accepting connections yet) and 25006 (a read-only transaction: connected to a
 * standby, as right after a failover); MySQL/MariaDB's lost connection and shutdown.
 */
const FAILURE_CODES =
  /^(?:ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH|EAI_AGAIN|08[0-9A-Z]{3}|57P0[123]|25006|PROTOCOL_CONNECTION_LOST|ER_SERVER_SHUTDOWN|ER_CONNECTION_KILLED)$/;

/** FAILURE_CODES less Node's socket errors. */
const DATABASE_FAILURE_CODES =
  /^(?:08[0-9A-Z]{3}|57P0[123]|25006|PROTOCOL_CONNECTION_LOST|ER_SERVER_SHUTDOWN|ER_CONNECTION_KILLED)$/;

/** pg reports a dropped connection without a code. */
const FAILURE_MESSAGES =
  /^(?:Connection terminated|Connection terminated unexpectedly|Client has encountered a connection error and is not queryable|Client was closed and is not queryable)$/;
