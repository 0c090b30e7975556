import {
  Inject,
  Injectable,
  type OnApplicationBootstrap,
  type OnModuleDestroy,
} from '@nestjs/common';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from './idempotency.options.js';
import { IdempotencyStore } from './storage/idempotency-store.interface.js';
import { IdempotencyMetrics } from './idempotency-metrics.js';
import { timerDelay } from './utils/duration.js';
import { quietLogger } from './utils/quiet-logger.js';

/**
 * Deletes expired records in batches, every `purgeInterval`. Requests never wait for it: it runs
 * on a timer, one batch per statement, yielding to the event loop between batches, and a run is
 * skipped while the previous one is still going.
 */
@Injectable()
export class IdempotencyPurgeJob implements OnApplicationBootstrap, OnModuleDestroy {
  private readonly logger = quietLogger('Idempotency');
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<number> | undefined;
  private stopped = false;

  constructor(
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
    @Inject(RESOLVED_OPTIONS) private readonly options: ResolvedModuleOptions,
    private readonly metrics: IdempotencyMetrics,
  ) {}

  /** Starts the purge timer (every `purgeInterval`, default `'1m'`), unless `purgeInterval` is `false` or `0`. */
  onApplicationBootstrap(): void {
    if (this.options.purgeIntervalMs <= 0) return;
    this.timer = setInterval(() => {
      this.purgeNow().catch((error: Error) =>
        this.logger.warn(`Purge of expired keys failed, retrying next interval: ${error.message}`),
      );
    }, timerDelay(this.options.purgeIntervalMs));
    this.timer.unref();
  }

  /** Stops the timer and waits for a purge that is running to finish. */
  async onModuleDestroy(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    await this.running?.catch(() => undefined);
  }

  /**
   * Deletes every record expired by now, batch by batch, and returns how many it deleted. A call
   * while a purge runs joins that purge.
   */
  purgeNow(): Promise<number> {
    this.running ??= this.purgeAll().finally(() => (this.running = undefined));
    return this.running;
  }

  private async purgeAll(): Promise<number> {
    const now = Date.now();
    let total = 0;
    for (;;) {
      const deleted = await this.store.purgeExpired(now, this.options.purgeBatchSize);
      total += deleted;
      this.metrics.record('purged', deleted);
      if (deleted < this.options.purgeBatchSize || this.stopped) break;
      await yieldToEventLoop();
    }
    if (total > 0) this.logger.debug(`Purged ${total} expired idempotency keys`);
    return total;
  }
}
