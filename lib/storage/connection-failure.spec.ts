import { isConnectionFailure } from './connection-failure.js';

describe('isConnectionFailure', () => {
  const withCode = (code: string) => Object.assign(new Error('x'), { code });

  it('recognises lost connections and servers that cannot take the statement', () => {
    for (const error of [
      withCode('ECONNRESET'),
      withCode('ECONNREFUSED'),
      withCode('57P01'),
      withCode('08006'),
      withCode('25006'),
      withCode('PROTOCOL_CONNECTION_LOST'),
      // MariaDB's "Connection was killed" as mysql2 reports it: a number, no code.
      Object.assign(new Error('Connection was killed'), { errno: 1927 }),
      new Error('Connection terminated unexpectedly'),
      // TypeORM's QueryFailedError keeps the driver's error.
      Object.assign(new Error('query failed'), { driverError: withCode('57P01') }),
      new Error('wrapped', { cause: new Error('Connection terminated') }),
    ]) {
      expect(isConnectionFailure(error)).toBe(true);
    }
  });

  it("leaves the statement's own errors alone", () => {
    for (const error of [
      withCode('23505'),
      withCode('42P01'),
      withCode('40001'),
      new Error('Connection terminated by the user in the message of a business error, say'),
      undefined,
      'text',
    ]) {
      expect(isConnectionFailure(error)).toBe(false);
    }
  });
});
