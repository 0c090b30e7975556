import type { RecordWatch } from './idempotency-store.interface.js';

/**
 * The watches of a store that pushes changes, by change tag: a store's listener wakes the watches
 * of a tag when that record changes, and every watch when its `live` flips (so waiters re-read at
 * once: nothing that happened while nobody listened goes unseen).
 */
export class RecordWatches {
  private readonly watches = new Map<string, Set<Watch>>();

  /** `isLive`: whether changes are being pushed right now. */
  constructor(private readonly isLive: () => boolean) {}

  watch(tag: string): RecordWatch {
    const watch: Watch = new Watch(this.isLive, () => this.unwatch(tag, watch));
    let watches = this.watches.get(tag);
    if (!watches) this.watches.set(tag, (watches = new Set()));
    watches.add(watch);
    return watch;
  }

  wake(tag: string): void {
    this.watches.get(tag)?.forEach((watch) => watch.wake());
  }

  wakeAll(): void {
    this.watches.forEach((watches) => watches.forEach((watch) => watch.wake()));
  }

  private unwatch(tag: string, watch: Watch) {
    const watches = this.watches.get(tag);
    watches?.delete(watch);
    if (watches?.size === 0) this.watches.delete(tag);
  }
}

/** One waiter's subscription: a wake-up that arrives while nobody awaits `changed` is kept. */
class Watch implements RecordWatch {
  private pending = false;
  private resolveWait: (() => void) | undefined;

  constructor(
    private readonly isLive: () => boolean,
    private readonly unsubscribe: () => void,
  ) {}

  get live(): boolean {
    return this.isLive();
  }

  changed(timeoutMs: number): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.pending = false;
        this.resolveWait = undefined;
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.resolveWait = done;
    });
  }

  wake() {
    this.pending = true;
    this.resolveWait?.();
  }

  close() {
    this.resolveWait?.();
    this.unsubscribe();
  }
}
