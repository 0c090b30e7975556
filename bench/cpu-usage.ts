import { readdirSync, readFileSync } from 'node:fs';

type Group = 'app' | 'runner' | 'postgres' | 'redis' | 'machine';

/** Pseudo pid of the whole machine's busy time (/proc/stat). */
const MACHINE = -1;

/**
 * CPU seconds used so far per process, grouped: the app under load, the load generator (this
 * process), every `postgres` process on the machine (other sessions' backends included: a noisy
 * upper bound) and `redis-server`. Per process, so one that exits in between does not count
 * negative.
 */
export type CpuSnapshot = Map<number, { readonly group: Group; readonly seconds: number }>;

const TICKS_PER_SECOND = 100;

/**
 * Reads /proc (Linux): which process burns the CPU tells whether a route is limited by the app's
 * JavaScript or by the database. Elsewhere it reports zeros rather than failing the run.
 */
export function cpuSnapshot(appPid: number): CpuSnapshot {
  const snapshot: CpuSnapshot = new Map();
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((name) => /^\d+$/.test(name));
  } catch {
    return snapshot;
  }
  for (const pid of pids) {
    const stat = readStat(pid);
    if (!stat) continue;
    const group: Group | undefined =
      Number(pid) === appPid
        ? 'app'
        : Number(pid) === process.pid
          ? 'runner'
          : stat.comm === 'postgres'
            ? 'postgres'
            : stat.comm === 'redis-server'
              ? 'redis'
              : undefined;
    if (group) snapshot.set(Number(pid), { group, seconds: stat.seconds });
  }
  const machine = machineBusySeconds();
  if (machine !== undefined) snapshot.set(MACHINE, { group: 'machine', seconds: machine });
  return snapshot;
}

/**
 * Busy CPU seconds of the whole machine, all cores. Processes of other sandboxes on the same VM
 * are invisible in /proc but not here: the difference is the `other` column.
 */
function machineBusySeconds(): number | undefined {
  try {
    const [, ...fields] = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/);
    const [user, nice, system, , , irq, softirq, steal] = fields.map(Number);
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND;
  } catch {
    return undefined;
  }
}

/** How busy the machine's cores were (0–1 of all of them) over `ms`, before the bench adds load. */
export async function machineBusyFraction(ms: number): Promise<number | null> {
  const before = machineBusySeconds();
  const started = performance.now();
  await new Promise((resolve) => setTimeout(resolve, ms));
  const after = machineBusySeconds();
  if (before === undefined || after === undefined) return null;
  const cores = readFileSync('/proc/stat', 'utf8')
    .split('\n')
    .filter((line) => /^cpu\d/.test(line)).length;
  return (after - before) / (((performance.now() - started) / 1000) * cores);
}

function readStat(pid: string): { comm: string; seconds: number } | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const comm = text.slice(text.indexOf('(') + 1, text.lastIndexOf(')'));
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after "pid (comm) ".
    return { comm, seconds: (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND };
  } catch {
    return undefined; // the process ended between readdir and read
  }
}

/** CPU milliseconds per request of each process group between two snapshots. */
export function cpuPerRequest(before: CpuSnapshot, after: CpuSnapshot, requests: number) {
  const used: Record<Group, number> = { app: 0, runner: 0, postgres: 0, redis: 0, machine: 0 };
  for (const [pid, { group, seconds }] of after)
    used[group] += seconds - (before.get(pid)?.seconds ?? 0);
  const per = (seconds: number) =>
    Math.round((seconds * 1000 * 1000) / Math.max(1, requests)) / 1000;
  const visible = used.app + used.runner + used.postgres + used.redis;
  return {
    app_ms: per(used.app),
    runner_ms: per(used.runner),
    postgres_ms: per(used.postgres),
    redis_ms: per(used.redis),
    /** Everything else on the machine: kernel threads, other sandboxes' processes. */
    other_ms: per(Math.max(0, used.machine - visible)),
  };
}

export type CpuPerRequest = ReturnType<typeof cpuPerRequest>;
