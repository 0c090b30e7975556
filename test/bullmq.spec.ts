import { Queue, type Job } from 'bullmq';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import type { TransferJobData, TransferJobResult } from './fixtures/bullmq-worker.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { describeOnPostgres, runTag, waitFor } from './support/reliability.js';

const REDIS_URL = process.env.REDIS_URL;
const describeWithRedis: typeof describeOnPostgres = REDIS_URL
  ? describeOnPostgres
  : (name) =>
      describe.skip(`${name} (no Redis: set REDIS_URL)`, () => {
        it('needs Redis', () => undefined);
      });

describeWithRedis('BullMQ jobs through IdempotentWorkerHost, 3 worker processes', (url) => {
  let db: DataSource;
  let effects: string;
  let queue: Queue<TransferJobData, TransferJobResult>;
  let workers: AppProcess[] = [];

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
  });
  afterAll(() => db?.destroy());

  beforeEach(async () => {
    effects = runTag('bullmq_effects');
    await db.query(
      `CREATE TABLE ${effects} (id serial PRIMARY KEY, job_key text NOT NULL, job_id text NOT NULL, amount int NOT NULL, pid int NOT NULL)`,
    );
    await db.query(`CREATE TABLE ${effects}_hangs (job_id text PRIMARY KEY, pid int NOT NULL)`);
    const name = runTag('nestjs-idempotency-test');
    const redis = new URL(REDIS_URL!);
    queue = new Queue(name, {
      connection: { host: redis.hostname, port: Number(redis.port || 6379) },
    });
    workers = await Promise.all(
      [1, 2, 3].map(() =>
        startAppProcess('test/fixtures/bullmq-worker.js', {
          REDIS_URL: REDIS_URL!,
          DATABASE_URL: url,
          QUEUE: name,
          EFFECTS: effects,
        }),
      ),
    );
  });
  afterEach(async () => {
    await Promise.all(workers.map((worker) => worker.stop('SIGKILL')));
    await queue.obliterate({ force: true });
    await queue.close();
    await db.query(`DROP TABLE IF EXISTS ${effects}, ${effects}_hangs`);
  });

  /** The worker that printed `hanging <job id>`, once one has. */
  const hangingWorker = (job: Job) =>
    waitFor(
      `a worker to hang on job ${job.id}`,
      () => workers.find((worker) => worker.output().includes(`hanging ${job.id}`)),
      { timeoutMs: 20_000 },
    );

  const finished = (jobs: readonly Job[]) =>
    waitFor(
      'the jobs to finish',
      async () => {
        const states = await Promise.all(jobs.map((job) => job.getState()));
        return states.every((state) => state === 'completed' || state === 'failed')
          ? Promise.all(jobs.map((job) => queue.getJob(job.id!)))
          : undefined;
      },
      { timeoutMs: 45_000, intervalMs: 100 },
    );

  /** The effect rows written for a key (`job_key`), or by one job (`job_id`). */
  const effectsOf = async (key: string, column: 'job_key' | 'job_id' = 'job_key') =>
    (await db.query(`SELECT id, pid FROM ${effects} WHERE ${column} = $1`, [key])) as {
      id: number;
      pid: number;
    }[];

  it('a worker SIGKILLed after its job committed: the redelivered copy replays the stored return value, one effect per job', async () => {
    const jobs = await queue.addBulk(
      Array.from({ length: 12 }, (_, i) => ({ name: 'transfer', data: { amount: i + 1 } })),
    );
    const victim = await queue.add('transfer', { amount: 99, hang: 'after-commit' });
    const killed = await hangingWorker(victim);
    await killed.stop('SIGKILL');
    const done = await finished([...jobs, victim]);

    for (const job of done) {
      expect(await job!.getState()).toBe('completed');
      const rows = await effectsOf(job!.id!, 'job_id');
      expect(rows).toHaveLength(1);
      expect(job!.returnvalue).toEqual({
        effect: rows[0].id,
        pid: rows[0].pid,
        amount: job!.data.amount,
      });
    }
    const redelivered = done.at(-1)!;
    // Run by the worker that died, re-queued by BullMQ's stalled checker, answered by another
    // worker from the store: its return value is the dead worker's.
    expect(redelivered.stalledCounter).toBeGreaterThanOrEqual(1);
    expect(redelivered.returnvalue.pid).toBe(killed.child.pid);
  });

  it('a worker SIGKILLed mid-job (its transaction open): another worker takes the key over once its lock lapses, one effect', async () => {
    const victim = await queue.add('transfer', { amount: 7, hang: 'mid-work' });
    const others = await queue.addBulk(
      Array.from({ length: 6 }, (_, i) => ({ name: 'transfer', data: { amount: i + 1 } })),
    );
    const killed = await hangingWorker(victim);
    await killed.stop('SIGKILL');
    const done = await finished([victim, ...others]);

    for (const job of done) {
      expect(await job!.getState()).toBe('completed');
      expect(await effectsOf(job!.id!, 'job_id')).toHaveLength(1);
    }
    // The dead worker's write was rolled back with its transaction; the row is the second run's.
    const [row] = await effectsOf(victim.id!, 'job_id');
    expect(row.pid).not.toBe(killed.child.pid);
    expect(done[0]!.returnvalue).toEqual({ effect: row.id, pid: row.pid, amount: 7 });
  });

  it('duplicate jobs with one data key run once and return the same value; another payload under it fails unrecoverably', async () => {
    const transferId = `T-${randomUUID()}`;
    const copies = await queue.addBulk(
      Array.from({ length: 5 }, () => ({ name: 'transfer', data: { amount: 50, transferId } })),
    );
    const done = await finished(copies);
    const rows = await effectsOf(transferId);
    expect(rows).toHaveLength(1);
    for (const job of done) {
      expect(await job!.getState()).toBe('completed');
      expect(job!.returnvalue).toEqual({ effect: rows[0].id, pid: rows[0].pid, amount: 50 });
    }

    const other = await queue.add('transfer', { amount: 51, transferId }, { attempts: 3 });
    const [failed] = await finished([other]);
    expect(await failed!.getState()).toBe('failed');
    expect(failed!.attemptsMade).toBe(1);
    expect(failed!.failedReason).toMatch(/already used with a different payload/);
    expect(await effectsOf(transferId)).toHaveLength(1);
  });
});
