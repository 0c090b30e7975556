import type { DataSourceOptions } from 'typeorm';
import { eachDatabase, type TestDatabase } from './databases.js';
import { TcpProxy } from './tcp-proxy.js';

/** Databases reached over TCP (their options carry a URL): a proxy can stall their connections. */
export const serverDatabases = eachDatabase.filter(
  ([, database]) => typeof (database.options() as { url?: unknown }).url === 'string',
);

/** A TcpProxy listening in front of `database` (one of `serverDatabases`). */
export function startProxyFor(database: TestDatabase): Promise<TcpProxy> {
  const target = new URL(urlOf(database));
  return TcpProxy.start({ host: target.hostname, port: Number(target.port) });
}

/** `database` as reached through `proxy`: its connections go by the proxy, the rest is the same. */
export function throughProxy(database: TestDatabase, proxy: TcpProxy): TestDatabase {
  const url = urlOf(database);
  return {
    ...database,
    options: () => ({ ...database.options(), url: proxy.proxiedUrl(url) }) as DataSourceOptions,
  };
}

function urlOf(database: TestDatabase): string {
  return (database.options() as { url: string }).url;
}
