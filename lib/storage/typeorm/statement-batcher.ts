/** How a batcher runs its statements. */
export interface BatchRunner<Item, Result> {
  /** Identifies the row an item touches: a batch never holds two items of one row. */
  keyOf(item: Item): string;
  /**
   * One item, with the statement of one row. `afterFailedBatch`: its batch failed, and may have
   * been applied all the same (committed, then its answer lost with the connection): a statement
   * that finds its own change already made counts it as done.
   */
  runOne(item: Item, afterFailedBatch: boolean): Promise<Result>;
  /**
   * Several items (distinct rows, ordered by key), with one statement. Per item, in order: its
   * result, or `undefined` when the statement could not decide it (it is then run alone).
   */
  runMany(items: readonly Item[]): Promise<readonly (Result | undefined)[]>;
}

interface Pending<Item, Result> {
  readonly item: Item;
  readonly key: string;
  readonly resolve: (result: Result) => void;
  readonly reject: (error: unknown) => void;
}

/**
 * Gathers the statements that concurrent requests issue in one turn of the event loop into one
 * statement: one round trip, one commit and one wake-up of a server process for all of them,
 * instead of one each. An item waits at most until the loop's check phase (`setImmediate`), so a
 * lone request pays nothing measurable; under load, batches grow with the load.
 *
 * Each item's outcome is its own row's, exactly as if it ran alone. Items of the same row go to
 * different batches (a statement may not change a row twice). A batch that fails (a deadlock
 * between two batches, a value the server refuses) is run again item by item, so one item's error
 * is reported to that item only. A batch whose answer was lost after it committed is run again
 * the same way: each item then finds its own change made (see `runOne`).
 */
export class StatementBatcher<Item, Result> {
  private pending: Pending<Item, Result>[] = [];
  private scheduled = false;

  constructor(
    private readonly runner: BatchRunner<Item, Result>,
    private readonly maxBatch = 256,
  ) {}

  run(item: Item): Promise<Result> {
    return new Promise<Result>((resolve, reject) => {
      this.pending.push({ item, key: this.runner.keyOf(item), resolve, reject });
      this.schedule();
    });
  }

  private schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }

  private flush() {
    this.scheduled = false;
    const batch: Pending<Item, Result>[] = [];
    const later: Pending<Item, Result>[] = [];
    const keys = new Set<string>();
    for (const entry of this.pending) {
      if (batch.length < this.maxBatch && !keys.has(entry.key)) {
        keys.add(entry.key);
        batch.push(entry);
      } else {
        later.push(entry);
      }
    }
    this.pending = later;
    if (later.length > 0) this.schedule();
    if (batch.length === 1) return this.alone(batch[0], false);
    // One order for every batch: two batches lock their rows in the same order.
    batch.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    this.runner.runMany(batch.map((entry) => entry.item)).then(
      (results) =>
        batch.forEach((entry, i) =>
          results[i] === undefined ? this.alone(entry, false) : entry.resolve(results[i]),
        ),
      () => batch.forEach((entry) => this.alone(entry, true)),
    );
  }

  private alone(entry: Pending<Item, Result>, afterFailedBatch: boolean) {
    this.runner.runOne(entry.item, afterFailedBatch).then(entry.resolve, entry.reject);
  }
}
