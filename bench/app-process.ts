/**
 * Child process entry of our app under load: `node --expose-gc dist/bench/app-process.js <database>`.
 * The app runs apart from autocannon so the load generator does not share its event loop; the
 * runner drives it over the IPC channel (see child-process.ts for the protocol).
 */
import { Session } from 'node:inspector/promises';
import {
  heldCount,
  releaseHeld,
  startBenchApp,
  type BenchApp,
  type BenchDatabase,
} from './bench-app.js';
import type { ChildCommand, ChildReply } from './child-process.js';

const database = process.argv[2] as BenchDatabase;
if (database !== 'postgres' && database !== 'pglite' && database !== 'redis') {
  throw new TypeError(
    `usage: app-process.js postgres|pglite|redis; got ${String(process.argv[2])}`,
  );
}
if (!process.send) throw new Error('app-process.js must be started with an IPC channel (fork)');

const bench: BenchApp = await startBenchApp({
  database,
  databaseUrl: process.env.BENCH_DATABASE_URL ?? '',
  schema: process.env.BENCH_SCHEMA ?? 'bench',
  redisUrl: process.env.BENCH_REDIS_URL ?? '',
});

/** Forced collection first when available, so RSS after the load is not just uncollected garbage. */
function memory() {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  const { rss, heapUsed, external } = process.memoryUsage();
  return { rss, heapUsed, external, gcForced: gc !== undefined };
}

/** The inspector session of `profile-start` … `profile-stop`. */
let profiler: Session | undefined;

async function handle(command: ChildCommand): Promise<unknown> {
  switch (command.cmd) {
    case 'profile-start':
      profiler = new Session();
      profiler.connect();
      await profiler.post('Profiler.enable');
      await profiler.post('Profiler.setSamplingInterval', { interval: 100 });
      await profiler.post('Profiler.start');
      return null;
    case 'profile-stop': {
      if (!profiler) throw new Error('profile-start first');
      const { profile } = await profiler.post('Profiler.stop');
      profiler.disconnect();
      profiler = undefined;
      return profile;
    }
    case 'queries-reset':
      return bench.counter.reset();
    case 'queries-read':
      return bench.counter.read();
    case 'memory':
      return memory();
    case 'held':
      return heldCount();
    case 'release-held':
      return releaseHeld();
    case 'pool':
      return bench.pool();
    case 'purge': {
      const started = performance.now();
      const deleted = await bench.purgeJob.purgeNow();
      return { deleted, ms: performance.now() - started };
    }
    case 'close':
      await bench.close();
      setImmediate(() => process.exit(0));
      return null;
    default:
      throw new Error(`unknown command ${command.cmd}`);
  }
}

process.on('message', (command: ChildCommand) => {
  handle(command).then(
    (result) => process.send!({ id: command.id, ok: true, result } satisfies ChildReply),
    (error: Error) =>
      process.send!({ id: command.id, ok: false, error: error.message } satisfies ChildReply),
  );
});

// The runner going away (Ctrl-C, crash) must not leave an orphan holding a port and a pool.
process.on('disconnect', () => {
  void bench.close().finally(() => process.exit(0));
});

process.send({ type: 'ready', port: bench.port });
