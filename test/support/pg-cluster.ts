import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { appendFile, chmod, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

/**
 * PostgreSQL clusters of a test's own, made with the machine's PostgreSQL tools (initdb, pg_ctl,
 * pg_basebackup): a primary and a streaming standby that can be promoted. Removed by `remove()`.
 * As root, every tool runs as the `postgres` user (PostgreSQL refuses to run as root).
 */

const BIN = findBin();

/** The machine's PostgreSQL tools, if any (Debian: /usr/lib/postgresql/<major>/bin). */
function findBin(): string | undefined {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const majors = readdirSync(root)
    .filter((name) => existsSync(join(root, name, 'bin', 'initdb')))
    .sort((a, b) => Number(b) - Number(a));
  return majors.length ? join(root, majors[0], 'bin') : undefined;
}

export const havePostgresTools = BIN !== undefined;

const asRoot = process.getuid?.() === 0;

async function run(tool: string, args: string[]): Promise<string> {
  const [file, argv] = asRoot
    ? ['runuser', ['-u', 'postgres', '--', join(BIN!, tool), ...args]]
    : [join(BIN!, tool), args];
  try {
    const { stdout } = await promisify(execFile)(file, argv, { cwd: '/tmp', timeout: 120_000 });
    return stdout;
  } catch (error) {
    const failed = error as { stderr?: string; message: string };
    throw new Error(`${tool} ${args.join(' ')} failed: ${failed.stderr || failed.message}`, {
      cause: error,
    });
  }
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function ownedTempDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  if (asRoot) await promisify(execFile)('chown', ['postgres', dir]);
  await chmod(dir, 0o700);
  return dir;
}

export class PgCluster {
  private running = false;

  private constructor(
    readonly name: string,
    readonly dir: string,
    readonly port: number,
  ) {}

  /** postgres://postgres@127.0.0.1:<port>/postgres */
  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  /**
   * A new primary: trust auth on 127.0.0.1, replication allowed, fsync off (a test's data). With
   * `synchronousStandby`, a commit waits until that standby has flushed it.
   */
  static async primary(options: { synchronousStandby?: string } = {}): Promise<PgCluster> {
    const dir = await ownedTempDir('nestjs-idempotency-primary-');
    const cluster = new PgCluster('primary', join(dir, 'data'), await freePort());
    await run('initdb', ['-D', cluster.dir, '-U', 'postgres', '--auth=trust', '--no-sync']);
    await cluster.configure([
      `port = ${cluster.port}`,
      "listen_addresses = '127.0.0.1'",
      `unix_socket_directories = '${dir}'`,
      'wal_level = replica',
      'max_wal_senders = 5',
      'max_connections = 200',
      'fsync = off',
      'full_page_writes = off',
      ...(options.synchronousStandby
        ? [`synchronous_standby_names = '${options.synchronousStandby}'`, 'synchronous_commit = on']
        : []),
    ]);
    await appendFile(
      join(cluster.dir, 'pg_hba.conf'),
      'host replication postgres 127.0.0.1/32 trust\n',
    );
    await cluster.start();
    return cluster;
  }

  /** A streaming standby of `primary`, copied by pg_basebackup, named `name` to the primary. */
  static async standbyOf(primary: PgCluster, name: string): Promise<PgCluster> {
    const dir = await ownedTempDir('nestjs-idempotency-standby-');
    const cluster = new PgCluster(name, join(dir, 'data'), await freePort());
    await run('pg_basebackup', [
      '-d',
      `host=127.0.0.1 port=${primary.port} user=postgres application_name=${name}`,
      '-D',
      cluster.dir,
      '-R',
      '-X',
      'stream',
      '--no-sync',
    ]);
    await cluster.configure([
      `port = ${cluster.port}`,
      `unix_socket_directories = '${dir}'`,
      'hot_standby = on',
      "synchronous_standby_names = ''",
    ]);
    await cluster.start();
    return cluster;
  }

  async start(): Promise<void> {
    await run('pg_ctl', ['-D', this.dir, '-l', join(this.dir, '..', 'log'), '-w', 'start']);
    this.running = true;
  }

  /** Stops at once, as a crash would (`immediate`: no checkpoint, clients cut off). */
  async crash(): Promise<void> {
    await run('pg_ctl', ['-D', this.dir, '-m', 'immediate', '-w', 'stop']);
    this.running = false;
  }

  /** Ends recovery: the standby becomes a primary that takes writes. */
  async promote(): Promise<void> {
    await run('pg_ctl', ['-D', this.dir, '-w', 'promote']);
  }

  async remove(): Promise<void> {
    if (this.running) await this.crash().catch(() => undefined);
    await rm(join(this.dir, '..'), { recursive: true, force: true });
  }

  private async configure(lines: string[]): Promise<void> {
    await appendFile(join(this.dir, 'postgresql.conf'), `\n${lines.join('\n')}\n`);
  }
}
