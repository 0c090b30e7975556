import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { BENCH_CONFIG, PEER_DIR, PROJECT_ROOT } from './bench-config.js';

/** What the machine offers; a missing service skips its part of the run instead of failing it. */
export interface Services {
  /** PostgreSQL server version, or null with the reason in `skipped`. */
  readonly postgres: string | null;
  readonly redis: string | null;
  /** The peer app's dependencies are installed in bench/peer/node_modules. */
  readonly peer: boolean;
  readonly skipped: string[];
}

export async function detectServices(): Promise<Services> {
  const skipped: string[] = [];
  const postgres = await postgresVersion().catch((error: Error) => {
    skipped.push(
      `PostgreSQL at ${BENCH_CONFIG.databaseUrl} unreachable (${error.message}): PostgreSQL routes, growth and purge skipped`,
    );
    return null;
  });
  const redis = await redisVersion().catch((error: Error) => {
    skipped.push(
      `Redis at ${BENCH_CONFIG.redisUrl} unreachable (${error.message}): peer_redis skipped`,
    );
    return null;
  });
  let peer = true;
  try {
    installPeer();
  } catch (error) {
    peer = false;
    skipped.push(
      `bench/peer dependencies could not be installed (${(error as Error).message}): peer routes skipped`,
    );
  }
  return { postgres, redis, peer, skipped };
}

async function postgresVersion(): Promise<string> {
  const client = new pg.Client({
    connectionString: BENCH_CONFIG.databaseUrl,
    connectionTimeoutMillis: 3000,
  });
  await client.connect();
  try {
    const { rows } = await client.query<{ server_version: string }>('SHOW server_version');
    return rows[0].server_version;
  } finally {
    await client.end();
  }
}

/** RESP by hand (INFO server): the root package has no Redis client, only the peer app does. */
function redisVersion(): Promise<string> {
  const url = new URL(BENCH_CONFIG.redisUrl);
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host: url.hostname, port: Number(url.port || 6379) });
    let reply = '';
    socket.setTimeout(3000, () => socket.destroy(new Error('timed out')));
    socket.on('connect', () => socket.write('INFO server\r\n'));
    socket.on('data', (chunk) => {
      reply += chunk.toString();
      const match = /redis_version:([^\r\n]+)/.exec(reply);
      if (match) {
        socket.end();
        resolve(match[1]);
      } else if (reply.startsWith('-')) {
        socket.destroy(new Error(reply.trim()));
      }
    });
    socket.on('error', reject);
  });
}

/**
 * The peer app's own node_modules, from its committed lockfile, on first run. `npm ci` rather than
 * `install`, so every run compares against the same peer versions.
 */
function installPeer(): void {
  if (existsSync(join(PEER_DIR, 'node_modules', '@node-idempotency', 'nestjs', 'package.json')))
    return;
  console.log(
    'Installing bench/peer dependencies (NestJS 10 + @node-idempotency/nestjs), first run only…',
  );
  execFileSync('npm', ['ci', '--prefix', PEER_DIR, '--no-audit', '--no-fund'], {
    stdio: 'inherit',
  });
}

/** The bench's own schema, emptied: never the `public.idempotency_records` the tests use. */
export async function resetSchema(schema: string): Promise<void> {
  await withClient(async (client) => {
    await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
    await client.query(`CREATE SCHEMA ${schema}`);
  });
}

export async function dropSchema(schema: string): Promise<void> {
  await withClient((client) => client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`));
}

export async function withClient<T>(work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: BENCH_CONFIG.databaseUrl });
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

function packageVersion(dir: string, name: string): string {
  try {
    const manifest = JSON.parse(
      readFileSync(join(dir, 'node_modules', name, 'package.json'), 'utf8'),
    ) as { version: string };
    return manifest.version;
  } catch {
    return 'not installed';
  }
}

/** The figures' context, for results.md and results.json. */
export function describeMachine(services: Services) {
  const cpus = os.cpus();
  return {
    date: new Date().toISOString(),
    cpu: cpus[0]?.model ?? 'unknown',
    cores: cpus.length,
    memory_gib: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    nest: packageVersion(PROJECT_ROOT, '@nestjs/core'),
    typeorm: packageVersion(PROJECT_ROOT, 'typeorm'),
    pg_driver: packageVersion(PROJECT_ROOT, 'pg'),
    postgresql: services.postgres ?? 'absent',
    pglite: packageVersion(PROJECT_ROOT, '@electric-sql/pglite'),
    redis: services.redis ?? 'absent',
    autocannon: packageVersion(PROJECT_ROOT, 'autocannon'),
    peer_nest: packageVersion(PEER_DIR, '@nestjs/core'),
    peer_library: `@node-idempotency/nestjs ${packageVersion(PEER_DIR, '@node-idempotency/nestjs')}`,
  };
}

export type MachineInfo = ReturnType<typeof describeMachine>;
