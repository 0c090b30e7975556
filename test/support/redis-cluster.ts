import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

/**
 * A Redis Cluster of a test's own, made of the machine's redis-server in cluster mode on free
 * loopback ports (each node's cluster bus is its port + 10000), in a temporary folder, without
 * persistence: `masters` masters, each with `replicasPerMaster` replicas, joined by
 * `redis-cli --cluster create`. `stop()` ends every node it started.
 */

/** Whether the machine has redis-server and redis-cli (the cluster specs skip without them). */
export const haveRedisTools = ['redis-server', 'redis-cli'].every((tool) => {
  try {
    execFileSync(tool, ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
});

const execFileAsync = promisify(execFile);

/** One redis-server process of the cluster. */
export interface ClusterNode {
  readonly port: number;
  readonly process: ChildProcess;
  /** Resolves once the process has exited. */
  readonly exited: Promise<void>;
}

/** A master and the hash slots it serves, as CLUSTER SHARDS reports them. */
export interface ClusterShard {
  readonly masterPort: number;
  readonly replicaPorts: number[];
  /** Inclusive [from, to] ranges. */
  readonly slots: [number, number][];
}

async function portFree(port: number): Promise<boolean> {
  const server = createServer();
  return new Promise((resolve) => {
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A free port whose cluster bus port (+10000) is free too. */
async function freeClusterPort(taken: Set<number>): Promise<number> {
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    if (taken.has(port) || taken.has(port + 10_000) || taken.has(port - 10_000)) continue;
    if ((await portFree(port)) && (await portFree(port + 10_000))) {
      taken.add(port);
      return port;
    }
  }
  throw new Error('no free port pair for a Redis Cluster node');
}

const running = (node: ClusterNode) =>
  node.process.exitCode === null && node.process.signalCode === null;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs redis-cli against 127.0.0.1:`port`; resolves with its output. */
export async function redisCli(port: number, ...args: string[]): Promise<string> {
  const { stdout } = await execFileAsync(
    'redis-cli',
    ['-h', '127.0.0.1', '-p', String(port), ...args],
    {
      timeout: 30_000,
    },
  );
  return stdout;
}

async function until<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  timeoutMs = 30_000,
  intervalMs = 100,
) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Redis Cluster: timed out waiting for ${what}`);
    await sleep(intervalMs);
  }
}

export class RedisClusterProcesses {
  private constructor(
    readonly dir: string,
    readonly nodes: ClusterNode[],
  ) {}

  /** The ports of the nodes still running. */
  get livePorts(): number[] {
    return this.nodes.filter(running).map((node) => node.port);
  }

  /**
   * Starts the nodes, joins them and resolves once every node reports `cluster_state:ok` and every
   * replica is in sync with its master. `nodeTimeoutMs` is cluster-node-timeout: how long a master
   * may be unreachable before its replica is promoted.
   */
  static async start({
    masters = 3,
    replicasPerMaster = 1,
    nodeTimeoutMs = 1000,
  }: { masters?: number; replicasPerMaster?: number; nodeTimeoutMs?: number } = {}) {
    const dir = await mkdtemp(join(tmpdir(), 'nestjs-idempotency-redis-cluster-'));
    const taken = new Set<number>();
    const nodes: ClusterNode[] = [];
    const cluster = new RedisClusterProcesses(dir, nodes);
    try {
      for (let index = 0; index < masters * (1 + replicasPerMaster); index++) {
        const port = await freeClusterPort(taken);
        const child = spawn(
          'redis-server',
          [
            '--port',
            String(port),
            '--bind',
            '127.0.0.1',
            '--cluster-enabled',
            'yes',
            '--cluster-config-file',
            join(dir, `nodes-${port}.conf`),
            '--cluster-node-timeout',
            String(nodeTimeoutMs),
            '--save',
            '',
            '--appendonly',
            'no',
            '--dir',
            dir,
            '--logfile',
            join(dir, `redis-${port}.log`),
          ],
          { stdio: 'ignore' },
        );
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        nodes.push({ port, process: child, exited });
      }
      for (const { port } of nodes)
        await until(`node ${port} to answer PING`, async () =>
          (await redisCli(port, 'PING')).trim() === 'PONG' ? true : undefined,
        );
      await execFileAsync(
        'redis-cli',
        [
          '--cluster',
          'create',
          ...nodes.map(({ port }) => `127.0.0.1:${port}`),
          '--cluster-replicas',
          String(replicasPerMaster),
          '--cluster-yes',
        ],
        { timeout: 60_000 },
      );
      await cluster.waitUntilHealthy(masters);
      return cluster;
    } catch (error) {
      await cluster.stop();
      throw error;
    }
  }

  /** The cluster's shards, as the node on `port` (by default the first live one) sees them. */
  async shards(port = this.livePorts[0]): Promise<ClusterShard[]> {
    // CLUSTER SLOTS: one entry per slot range: from, to, master [host, port, id], replicas...
    const { Redis } = await import('ioredis');
    const client = new Redis({
      host: '127.0.0.1',
      port,
      lazyConnect: true,
      maxRetriesPerRequest: 0,
    });
    try {
      await client.connect();
      const ranges = await client.cluster('SLOTS');
      const byMaster = new Map<number, ClusterShard>();
      for (const [from, to, master, ...replicas] of ranges) {
        const shard = byMaster.get(master[1]) ?? {
          masterPort: master[1],
          replicaPorts: replicas.map((replica) => replica[1]),
          slots: [],
        };
        shard.slots.push([from, to]);
        byMaster.set(master[1], shard);
      }
      return [...byMaster.values()];
    } finally {
      client.disconnect();
    }
  }

  /**
   * Resolves once every live node says `cluster_state:ok`, `masters` masters serve all 16384 slots
   * with at least one replica each, and every replica's link to its master is up and synced.
   */
  async waitUntilHealthy(masters: number, timeoutMs = 30_000): Promise<ClusterShard[]> {
    return until(
      'the cluster to be healthy',
      async () => {
        for (const port of this.livePorts) {
          if (!(await redisCli(port, 'CLUSTER', 'INFO')).includes('cluster_state:ok'))
            return undefined;
        }
        const shards = await this.shards();
        const covered = shards
          .flatMap((shard) => shard.slots)
          .reduce((sum, [from, to]) => sum + to - from + 1, 0);
        if (shards.length !== masters || covered !== 16_384) return undefined;
        for (const shard of shards) {
          if (shard.replicaPorts.length === 0) return undefined;
          for (const replica of shard.replicaPorts) {
            const info = await redisCli(replica, 'INFO', 'replication');
            if (
              !info.includes('master_link_status:up') ||
              info.includes('master_sync_in_progress:1')
            )
              return undefined;
          }
        }
        return shards;
      },
      timeoutMs,
    );
  }

  /**
   * Resolves, with `performance.now()`, once a surviving node reports `shard`'s replica as the
   * master of all of `shard`'s slots (polled every 50 ms).
   */
  async waitForPromotion(shard: ClusterShard, timeoutMs = 60_000): Promise<number> {
    const slots = JSON.stringify(shard.slots);
    return until(
      `a replica of ${shard.masterPort} to be promoted`,
      async () => {
        const now = await this.shards();
        const promoted = now.find((candidate) => shard.replicaPorts.includes(candidate.masterPort));
        return promoted && JSON.stringify(promoted.slots) === slots ? performance.now() : undefined;
      },
      timeoutMs,
      50,
    );
  }

  /** SIGKILLs the node on `port` and waits for its process to exit. */
  async kill(port: number): Promise<void> {
    const node = this.nodes.find((candidate) => candidate.port === port);
    if (!node) throw new Error(`no node on port ${port}`);
    node.process.kill('SIGKILL');
    await node.exited;
  }

  /** Ends every node still running (SIGKILL: the data is a test's) and removes the folder. */
  async stop(): Promise<void> {
    for (const node of this.nodes) if (running(node)) node.process.kill('SIGKILL');
    await Promise.all(this.nodes.map((node) => node.exited));
    await rm(this.dir, { recursive: true, force: true });
  }
}
