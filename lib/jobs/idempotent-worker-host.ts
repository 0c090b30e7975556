import { Inject } from '@nestjs/common';
import { WorkerHost } from '@nestjs/bullmq';
import { DelayedError, UnrecoverableError, type Job, type Worker } from 'bullmq';
import { IdempotencyConflictError, IdempotencyRunError } from '../errors/idempotency-run.errors.js';
import {
  IdempotencyRunner,
  type CompiledCallOptions,
  type IdempotentCallOptions,
  type IdempotentRunContext,
} from '../functions/idempotency-runner.js';
import type { ScopeValue } from '../interfaces/idempotency-options.interface.js';

/** The options of an `IdempotentWorkerHost`'s jobs: `IdempotencyRunner.run`'s, each defaulting to the module's. */
export type IdempotentJobOptions = IdempotentCallOptions;

/**
 * A `@nestjs/bullmq` processor whose jobs run once per key, across workers, redeliveries and
 * stalled-job recovery: BullMQ delivers a job at least once (a worker that stalls or dies has its
 * job run again by another), and this makes the second run a replay. Extend it instead of
 * `WorkerHost` and implement `handle` instead of `process`:
 *
 * ```ts
 * @Processor('transfers')
 * export class TransfersProcessor extends IdempotentWorkerHost<Job<Transfer>> {
 *   async handle(job: Job<Transfer>, ctx: IdempotentRunContext) { ... }
 * }
 * ```
 *
 * The key is the job's id (with its creation time when BullMQ numbered it; `idempotencyKey` to
 * take it from the data instead, so duplicate jobs run once); the payload fingerprinted is the job's name and data (`idempotencyPayload`); the
 * operation's name is `BullMQ <queue>` (`idempotencyName`). A redelivered or duplicate job returns
 * the first run's stored return value (so `job.returnvalue` is the same), without running
 * `handle`. A duplicate that finds the key still running waits (`concurrency: 'wait'`, up to
 * `waitTimeout`), then is moved back to delayed for a second without spending an attempt (BullMQ's
 * `DelayedError`); a refusal that no retry can change (another payload under the key, an invalid
 * key, an unreadable result) fails the job as an `UnrecoverableError` (no more attempts), its
 * `cause` the `IdempotencyRunError`. An error `handle` throws releases the key: BullMQ's own
 * retries (`attempts`) run it again.
 *
 * For effects that must not happen twice even when a worker dies between the effect and the
 * stored result, use `transactional: true` (in `idempotencyOptions`) and write through
 * `ctx.entityManager`: the writes and the stored result commit together.
 */
export abstract class IdempotentWorkerHost<
  J extends Job = Job,
  R = unknown,
  W extends Worker = Worker,
> extends WorkerHost<W> {
  /** The runner the jobs go through (injected). */
  @Inject(IdempotencyRunner) protected readonly idempotency!: IdempotencyRunner;

  /**
   * The jobs' options (`ttl`, `lockTimeout`, `transactional`, `concurrency`, …); override as a
   * field: `protected override readonly idempotencyOptions = { transactional: true }`.
   * @default {} (the module's options)
   */
  protected readonly idempotencyOptions: IdempotentJobOptions = {};

  private compiled: CompiledCallOptions | undefined;

  /** The job's work, run once per key. What it returns is stored and is every copy's return value. */
  abstract handle(job: J, context: IdempotentRunContext, token?: string): Promise<R>;

  /**
   * The job's key: the same for every attempt and redelivery of one job. A job given its own
   * `jobId` is keyed by it, so a job added again with that id (after the first was removed) is a
   * duplicate. A job BullMQ numbered is keyed by its id and creation time: its counter restarts at
   * 1 after `queue.obliterate()` or on a new Redis, and a new job must not get an old one's result.
   * @default job.opts.jobId ?? `${job.id}@${job.timestamp}`
   */
  protected idempotencyKey(job: J): string | number {
    return job.opts.jobId ?? `${job.id}@${job.timestamp}`;
  }

  /**
   * What is fingerprinted: a job with a used key and another payload is refused (unrecoverable).
   * @default { name: job.name, data: job.data }
   */
  protected idempotencyPayload(job: J): unknown {
    return { name: job.name, data: job.data as unknown };
  }

  /**
   * Whose key it is.
   * @default '' (one scope)
   */
  protected idempotencyScope(_job: J): ScopeValue {
    return '';
  }

  /**
   * The operation's name: keys are independent per name.
   * @default `BullMQ ${job.queueName}`
   */
  protected idempotencyName(job: J): string {
    return `BullMQ ${job.queueName}`;
  }

  /** Runs `handle` once per key (see the class). Called by `@nestjs/bullmq`'s worker. */
  async process(job: J, token?: string): Promise<R> {
    this.compiled ??= this.idempotency.compile(this.idempotencyOptions);
    try {
      const { value } = await this.idempotency.runCompiled(
        {
          key: this.idempotencyKey(job),
          name: this.idempotencyName(job),
          payload: this.idempotencyPayload(job),
          scope: this.idempotencyScope(job),
        },
        this.compiled,
        (context) => this.handle(job, context, token),
      );
      return value;
    } catch (error) {
      if (!(error instanceof IdempotencyRunError)) throw error;
      if (error instanceof IdempotencyConflictError && token !== undefined) {
        await job.moveToDelayed(Date.now() + error.retryAfterMs!, token);
        throw new DelayedError(error.message);
      }
      if (error.retryAfterMs === undefined) {
        const unrecoverable = new UnrecoverableError(error.message);
        unrecoverable.cause = error;
        throw unrecoverable;
      }
      throw error;
    }
  }
}
