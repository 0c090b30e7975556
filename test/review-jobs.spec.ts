/**
 * Review of the programmatic API (IdempotencyRunner, @IdempotentMethod(), IdempotentWorkerHost)
 * as a user meets it, on PostgreSQL (DATABASE_URL) and, for BullMQ and the Redis store, Redis
 * (REDIS_URL).
 */
import { Injectable, Module, type INestApplicationContext, type Provider } from '@nestjs/common';
import { BullModule, Processor } from '@nestjs/bullmq';
import { Test } from '@nestjs/testing';
import { Queue, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, readdir, rm, symlink, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { DataSource } from 'typeorm';
import {
  IdempotencyInvalidCallError,
  IdempotencyModule,
  IdempotencyPayloadMismatchError,
  IdempotencyRecord,
  IdempotencyRunner,
  IdempotentMethod,
  RedisIdempotencyStore,
  type IdempotencyModuleOptions,
  type IdempotentRunContext,
} from '../lib/index.js';
import { IdempotentWorkerHost, type IdempotentJobOptions } from '../lib/jobs/index.js';
import { describeOnPostgres, runTag, waitFor } from './support/reliability.js';

const REDIS_URL = process.env.REDIS_URL;
const ROOT = fileURLToPath(new URL('../', import.meta.url));
const execFileAsync = promisify(execFile);

/** Counts runs per key. */
class Runs {
  readonly of = new Map<string, number>();
  count(key: string): number {
    const next = (this.of.get(key) ?? 0) + 1;
    this.of.set(key, next);
    return next;
  }
}

@Injectable()
class Charges {
  readonly runs = new Runs();
  @IdempotentMethod({ key: (id: string) => id })
  async charge(id: string): Promise<{ run: number }> {
    return { run: this.runs.count(id) };
  }
}

/** A Charges-like class whose instance comes from a factory provider (`useFactory`). */
class FactoryCharges {
  readonly runs = new Runs();
  @IdempotentMethod({ key: (id: string) => id })
  async charge(id: string): Promise<{ run: number }> {
    return { run: this.runs.count(id) };
  }
}

/** Two unrelated classes of one name (as in two feature folders), each with `handle`. */
function handlerClass(kind: string, name?: string) {
  @Injectable()
  class Handler {
    readonly runs = new Runs();
    @IdempotentMethod({ key: (id: string) => id, name })
    async handle(id: string): Promise<string> {
      this.runs.count(id);
      return kind;
    }
  }
  return Handler;
}
const InvoiceHandler = handlerClass('invoice');
const RefundHandler = handlerClass('refund');
const NamedRefundHandler = handlerClass('refund', 'refunds.handle');

/** A base class with the decorated method; the provider is its subclass. */
class BaseCharges {
  readonly runs = new Runs();
  @IdempotentMethod({ key: (id: string) => id })
  async charge(id: string): Promise<{ run: number; by: string }> {
    return { run: this.runs.count(id), by: this.constructor.name };
  }
}
@Injectable()
class CardCharges extends BaseCharges {
  /** Calls the decorated method through `this`. */
  async chargeTwice(id: string) {
    return [await this.charge(id), await this.charge(id)];
  }
}

describeOnPostgres('Review of the programmatic API', (url) => {
  let dataSource: DataSource;
  const opened: INestApplicationContext[] = [];

  beforeAll(async () => {
    dataSource = new DataSource({ type: 'postgres', url, entities: [IdempotencyRecord] });
    await dataSource.initialize();
  });
  afterAll(async () => {
    for (const app of opened) await app.close();
    await dataSource?.destroy();
  });

  async function boot(
    imports: unknown[],
    providers: Provider[],
    options: IdempotencyModuleOptions = {},
  ): Promise<INestApplicationContext> {
    const moduleRef = await Test.createTestingModule({
      imports: [
        IdempotencyModule.forRoot({ dataSource, purgeInterval: false, ...options }),
        ...(imports as never[]),
      ],
      providers,
    }).compile();
    const app = await moduleRef.init();
    opened.push(app);
    return app;
  }

  it('IdempotencyModule imported twice (root and a feature module): a decorated method still runs once and answers at once', async () => {
    @Module({
      imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false, waitTimeout: '2s' })],
    })
    class FeatureModule {}
    const app = await boot([FeatureModule], [Charges], { waitTimeout: '2s' });
    const charges = app.get(Charges);
    const id = randomUUID();
    expect(await charges.charge(id)).toEqual({ run: 1 });
    expect(await charges.charge(id)).toEqual({ run: 1 });
    expect(charges.runs.of.get(id)).toBe(1);
  });

  it('forRootAsync: a decorated method is wrapped', async () => {
    const moduleRef = await Test.createTestingModule({
      imports: [
        IdempotencyModule.forRootAsync({
          useFactory: () => ({ dataSource, purgeInterval: false }),
        }),
      ],
      providers: [Charges],
    }).compile();
    const app = await moduleRef.init();
    opened.push(app);
    const charges = app.get(Charges);
    const id = randomUUID();
    await charges.charge(id);
    await charges.charge(id);
    expect(charges.runs.of.get(id)).toBe(1);
  });

  it('a decorated method on an instance made by a factory provider (useFactory) runs once per key', async () => {
    const app = await boot(
      [],
      [{ provide: FactoryCharges, useFactory: () => new FactoryCharges() }],
    );
    const charges = app.get(FactoryCharges);
    const id = randomUUID();
    await charges.charge(id);
    await charges.charge(id);
    expect(charges.runs.of.get(id)).toBe(1);
  });

  it('two classes of one name: refused at startup rather than sharing the key space of `Handler.handle`; given names, each runs', async () => {
    await expect(boot([], [InvoiceHandler, RefundHandler])).rejects.toThrow(
      /two classes named Handler .*Handler\.handle.*Give each a `name`/,
    );
    const app = await boot([], [InvoiceHandler, NamedRefundHandler]);
    const id = randomUUID();
    expect(await app.get(InvoiceHandler).handle(id)).toBe('invoice');
    expect(await app.get(NamedRefundHandler).handle(id)).toBe('refund');
    expect(app.get(NamedRefundHandler).runs.of.get(id)).toBe(1);
  });

  it('inheritance: a decorated method of a base class, called through `this` of the subclass provider, runs once', async () => {
    const app = await boot([], [CardCharges]);
    const charges = app.get(CardCharges);
    const id = randomUUID();
    expect(await charges.chargeTwice(id)).toEqual([
      { run: 1, by: 'CardCharges' },
      { run: 1, by: 'CardCharges' },
    ]);
    expect(charges.runs.of.get(id)).toBe(1);
  });

  describe('IdempotencyRunner.run', () => {
    let runner: IdempotencyRunner;
    beforeAll(async () => {
      runner = (await boot([], [])).get(IdempotencyRunner);
    });

    it('returns of every shape: undefined, a Buffer, a class instance replay as documented', async () => {
      class Receipt {
        constructor(readonly id: string) {}
        get label() {
          return `receipt ${this.id}`;
        }
      }
      const cases: [unknown, unknown][] = [
        [undefined, undefined],
        [Buffer.from('bytes'), Buffer.from('bytes')],
        [new Receipt('r1'), { id: 'r1' }],
        [{ at: new Date(0) }, { at: new Date(0).toJSON() }],
      ];
      for (const [returned, replayed] of cases) {
        const key = randomUUID();
        let runs = 0;
        const work = () => {
          runs++;
          return returned;
        };
        expect(await runner.runDetailed({ key, name: 'shapes' }, work)).toEqual({
          value: returned,
          replayed: false,
        });
        expect(await runner.runDetailed({ key, name: 'shapes' }, work)).toEqual({
          value: replayed,
          replayed: true,
        });
        expect(runs).toBe(1);
      }
    });

    it('a thrown non-Error (a string) is rethrown as it is and releases the key', async () => {
      const key = randomUUID();
      let runs = 0;
      const thrown = await runner
        .run({ key, name: 'non-error' }, () => {
          runs++;
          // The point of the test: a thrown non-Error.
          // eslint-disable-next-line @typescript-eslint/only-throw-error
          throw 'plain string';
        })
        .catch((error: unknown) => error);
      expect(thrown).toBe('plain string');
      expect(await runner.run({ key, name: 'non-error' }, () => ++runs)).toBe(2);
    });

    it('payloads: Dates are compared by value; BigInts and cycles are refused with a typed error, nothing run', async () => {
      const key = randomUUID();
      await runner.run({ key, name: 'dates', payload: { at: new Date(1) } }, () => 'ok');
      await expect(
        runner.run({ key, name: 'dates', payload: { at: new Date(2) } }, () => 'ok'),
      ).rejects.toBeInstanceOf(IdempotencyPayloadMismatchError);
      const cyclic: Record<string, unknown> = {};
      cyclic.self = cyclic;
      let runs = 0;
      for (const payload of [{ amount: 1n }, cyclic]) {
        const refused = await runner
          .run({ key: randomUUID(), name: 'payloads', payload }, () => ++runs)
          .catch((error: unknown) => error);
        expect(refused).toBeInstanceOf(IdempotencyInvalidCallError);
        expect(refused).toMatchObject({ code: 'body-unreadable' });
      }
      expect(runs).toBe(0);
    });

    it('keys: an object, 255 characters (accepted) and 256 (refused)', async () => {
      const refused = await runner
        .run({ key: { id: 1 } as never, name: 'keys' }, () => 'ran')
        .catch((error: unknown) => error);
      expect(refused).toBeInstanceOf(IdempotencyInvalidCallError);
      expect(await runner.run({ key: 'k'.repeat(255), name: randomUUID() }, () => 'ran')).toBe(
        'ran',
      );
    });

    it('encryption on: the result is sealed in the table, replayed in clear', async () => {
      const app = await boot([], [], {
        encryption: { keys: [randomBytes(32).toString('base64')] },
      });
      const sealed = app.get(IdempotencyRunner);
      const key = randomUUID();
      const secret = `secret-${randomUUID()}`;
      let runs = 0;
      const work = () => ({ secret, run: ++runs });
      await sealed.run({ key, name: 'sealed' }, work);
      expect(await sealed.run({ key, name: 'sealed' }, work)).toEqual({ secret, run: 1 });
      const rows = (await dataSource.query(
        `SELECT response_body FROM idempotency_records WHERE idempotency_key = $1`,
        [key],
      )) as { response_body: string }[];
      expect(rows).toHaveLength(1);
      expect(JSON.stringify(rows[0])).not.toContain(secret);
    });
  });

  (REDIS_URL ? describe : describe.skip)('on a store without transactions (Redis)', () => {
    let redis: Redis;
    let runner: IdempotencyRunner;
    beforeAll(async () => {
      redis = new Redis(REDIS_URL!);
      const store = new RedisIdempotencyStore(redis, { prefix: `${runTag('review-jobs')}:` });
      const app = await boot([], [], { store, waitTimeout: '200ms', lockTimeout: '30s' });
      runner = app.get(IdempotencyRunner);
    });
    afterAll(() => redis?.quit());

    it("run({ transactional: true }): refused, saying why, before the key is claimed; the next call isn't locked out", async () => {
      const key = randomUUID();
      let runs = 0;
      const refused = await runner
        .run({ key, name: 'tx', transactional: true }, () => ++runs)
        .catch((error: unknown) => error);
      expect(refused).toBeInstanceOf(Error);
      expect((refused as Error).message).toMatch(/transactional.*store/);
      expect(runs).toBe(0);
      // The same key, without transactional, runs at once: nothing holds it for lockTimeout.
      expect(await runner.run({ key, name: 'tx' }, () => ++runs)).toBe(1);
    });

    it('run() without transactional: ctx.entityManager is undefined', async () => {
      let seen: IdempotentRunContext | undefined;
      await runner.run({ key: randomUUID(), name: 'plain' }, (ctx) => {
        seen = ctx;
        return 1;
      });
      expect(seen).toBeDefined();
      expect(seen!.entityManager).toBeUndefined();
    });
  });

  (REDIS_URL ? describe : describe.skip)('IdempotentWorkerHost on one in-process worker', () => {
    const queueName = runTag('review-jobs');
    const redisUrl = new URL(REDIS_URL ?? 'redis://127.0.0.1:6379');
    const connection = { host: redisUrl.hostname, port: Number(redisUrl.port || 6379) };
    const runs = new Runs();
    /** Jobs whose handle holds until the test lets it go. */
    const holds = new Map<string, Promise<void>>();
    let queue: Queue;
    let app: INestApplicationContext;

    @Processor(queueName, { concurrency: 4 })
    class ReviewProcessor extends IdempotentWorkerHost<Job<{ key?: string; fail?: number }>> {
      protected override readonly idempotencyOptions: IdempotentJobOptions = {
        waitTimeout: '100ms',
      };
      protected override idempotencyKey(job: Job<{ key?: string }>) {
        return job.data.key ?? super.idempotencyKey(job as never);
      }
      async handle(job: Job<{ key?: string; fail?: number }>) {
        const run = runs.count(job.data.key ?? job.id!);
        await holds.get(job.data.key ?? '');
        if (job.data.fail !== undefined && run <= job.data.fail) throw new Error(`run ${run}`);
        return { run, job: job.id };
      }
    }

    beforeAll(async () => {
      queue = new Queue(queueName, { connection });
      app = await boot(
        [BullModule.forRoot({ connection }), BullModule.registerQueue({ name: queueName })],
        [ReviewProcessor],
      );
      await app.get(ReviewProcessor).worker.waitUntilReady();
    });
    afterAll(async () => {
      await queue?.obliterate({ force: true });
      await queue?.close();
    });

    const settled = (job: Job) =>
      waitFor(
        `job ${job.id} to finish`,
        async () => {
          const state = await job.getState();
          return state === 'completed' || state === 'failed'
            ? await queue.getJob(job.id!)
            : undefined;
        },
        { timeoutMs: 20_000, intervalMs: 50 },
      );

    it('a job whose handle throws, then succeeds on its next attempt: it runs again and returns the new value', async () => {
      const key = randomUUID();
      const job = await queue.add('x', { key, fail: 1 }, { attempts: 3 });
      const done = await settled(job);
      expect(await done!.getState()).toBe('completed');
      expect(done!.attemptsMade).toBe(2);
      expect(done!.returnvalue).toEqual({ run: 2, job: job.id });
      expect(runs.of.get(key)).toBe(2);
    });

    it('removeOnComplete: a copy added after the first was removed replays its value', async () => {
      const key = randomUUID();
      const first = await queue.add('x', { key }, { removeOnComplete: true });
      await waitFor('the first to be removed', async () =>
        (await queue.getJob(first.id!)) ? undefined : true,
      );
      const copy = await queue.add('x', { key }, { removeOnComplete: false });
      const done = await settled(copy);
      expect(done!.returnvalue).toEqual({ run: 1, job: first.id });
      expect(runs.of.get(key)).toBe(1);
    });

    it('a copy that finds the key running is moved back to delayed without spending an attempt, then replays', async () => {
      const key = randomUUID();
      let release!: () => void;
      holds.set(key, new Promise((resolve) => (release = resolve)));
      const first = await queue.add('x', { key }, { attempts: 1 });
      await waitFor('the first to run', () => (runs.of.get(key) === 1 ? true : undefined));
      const copy = await queue.add('x', { key }, { attempts: 1 });
      await waitFor(
        'the copy to be delayed',
        async () => ((await copy.getState()) === 'delayed' ? true : undefined),
        { timeoutMs: 10_000 },
      );
      release();
      const [a, b] = [await settled(first), await settled(copy)];
      expect(await b!.getState()).toBe('completed');
      expect(b!.returnvalue).toEqual(a!.returnvalue);
      expect(b!.attemptsMade).toBeLessThanOrEqual(1);
      expect(runs.of.get(key)).toBe(1);
    });

    // Defect, not fixed: the default key is the job's id, which BullMQ numbers from a counter in
    // Redis. `queue.obliterate()`, a flushed or replaced Redis, or another `prefix` starts it at 1
    // again, so a new job gets the id of an old one: within the records' ttl it is replayed without
    // running (same data) or failed unrecoverably as a payload mismatch (other data). A fix would
    // key auto-numbered jobs by id and creation time (`${job.id}@${job.timestamp}`) and keep a
    // custom `jobId` as it is; until then docs/jobs.md warns and recommends `idempotencyKey`.
    it('a new job that gets the id of an obliterated one runs (the id counter restarted)', async () => {
      await queue.obliterate({ force: true });
      const first = await queue.add('x', {});
      await settled(first);
      await queue.obliterate({ force: true });
      const second = await queue.add('x', {});
      expect(second.id).toBe(first.id);
      const done = await settled(second);
      expect(done!.returnvalue).toEqual({ run: 2, job: second.id });
      expect(runs.of.get(first.id!)).toBe(2);
    });

    it('a job refused unrecoverably: its cause is the typed error', async () => {
      const job = await queue.add('x', { key: 'é' }, { attempts: 3 });
      const done = await settled(job);
      expect(await done!.getState()).toBe('failed');
      expect(done!.attemptsMade).toBe(1);
      expect(done!.failedReason).toMatch(/key must be/);
    });
  });
});

describe('the packed package', () => {
  let dir: string | undefined;
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("`import 'nestjs-idempotency/bullmq'` works from the packed tarball, sharing the main entry's IdempotencyRunner", async () => {
    dir = await mkdtemp(join(tmpdir(), 'review-jobs-pack-'));
    const env = { ...process.env, NODE_OPTIONS: '' };
    const { stdout } = await execFileAsync('npm', ['pack', '--json', '--pack-destination', dir], {
      cwd: ROOT,
      env,
      maxBuffer: 64 * 1024 * 1024,
    });
    const [{ filename }] = JSON.parse(stdout) as { filename: string }[];
    const app = join(dir, 'app');
    const installed = join(app, 'node_modules', 'nestjs-idempotency');
    await mkdir(installed, { recursive: true });
    await execFileAsync('tar', [
      '-xzf',
      join(dir, filename),
      '-C',
      installed,
      '--strip-components=1',
    ]);
    // The app's own dependencies: this repository's (bullmq, @nestjs/bullmq, …).
    for (const entry of await readdir(join(ROOT, 'node_modules')))
      if (entry !== 'nestjs-idempotency' && !entry.startsWith('.'))
        await symlink(join(ROOT, 'node_modules', entry), join(app, 'node_modules', entry));
    const script = [
      "import 'reflect-metadata';",
      "const jobs = await import('nestjs-idempotency/bullmq');",
      "const main = await import('nestjs-idempotency');",
      "const token = Reflect.getMetadata('self:properties_metadata', jobs.IdempotentWorkerHost) ?? [];",
      'console.log(JSON.stringify({ host: typeof jobs.IdempotentWorkerHost, same: token.some((t) => t.type === main.IdempotencyRunner) }));',
    ].join('\n');
    const { stdout: out } = await execFileAsync('node', ['--input-type=module', '-e', script], {
      cwd: app,
      env,
    });
    expect(JSON.parse(out.trim().split('\n').at(-1)!)).toEqual({ host: 'function', same: true });
  }, 120_000);
});
