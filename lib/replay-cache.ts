import {
  recordName,
  type RecordId,
  type RecordInvalidation,
  type StoredResponse,
} from './storage/idempotency-store.interface.js';

/** Options of `replayCache` (see `IdempotencyModuleOptions.replayCache`). */
export interface ReplayCacheOptions {
  /**
   * Most completed records kept.
   * @default 10000
   */
  readonly maxEntries?: number;
  /**
   * Most bytes of stored bodies and headers kept; a response larger than a sixteenth of it is
   * never kept.
   * @default 16777216 (16 MiB)
   */
  readonly maxBytes?: number;
}

/** A completed record as the store returned it, with its response opened. */
export interface CachedRecord {
  readonly fingerprint: string;
  /** The lease token of its completion: a record forgotten and run again has another. */
  readonly token: string;
  /** Its TTL's end, epoch ms: past it the record is the store's to decide again. */
  readonly expiresAt: number;
  readonly response: StoredResponse;
}

interface Entry extends CachedRecord {
  readonly id: RecordId;
  readonly bytes: number;
}

/**
 * Completed records this process has read, so a later retry of the same key is answered without
 * a round trip. Safe because a completed record never changes before its TTL ends: no claim takes
 * it over, no completion or release matches it, no purge deletes it (every store decides with the
 * app's clock, as this cache does). An entry is dropped at its TTL's end, so from then on the
 * store decides. The oldest entries go first when a bound is reached (a hit does not reorder:
 * a Map lookup is all a replay costs). An operator's `forget` or `release` (see `IdempotencyAdmin`)
 * drops a record at once, in every process its store tells (`invalidate`).
 */
export class ReplayCache {
  private readonly entries = new Map<string, Entry>();
  private bytes = 0;
  /** Set while nobody tells this process what operators delete (see `suspend`). */
  private suspended = false;
  /**
   * Counts what dropped records (a deletion heard, a clear): a record read from the
   * store before a drop may be the very one dropped, so it is not cached after it (see `set`).
   */
  private drops = 0;
  /** Called once, when the first record is cached (see `onFirstUse`). */
  private firstUse: (() => void) | undefined;
  private readonly maxEntries: number;
  private readonly maxBytes: number;

  constructor(options: ReplayCacheOptions = {}) {
    this.maxEntries = options.maxEntries ?? 10_000;
    this.maxBytes = options.maxBytes ?? 16 * 1024 * 1024;
    if (!(Number.isInteger(this.maxEntries) && this.maxEntries > 0) || !(this.maxBytes > 0)) {
      throw new TypeError(
        'nestjs-idempotency: replayCache.maxEntries and maxBytes must be positive',
      );
    }
  }

  /** The record of `id` if it is cached and its TTL has not ended at `now`. */
  get(id: RecordId, now: number): CachedRecord | undefined {
    const name = recordName(id);
    const entry = this.entries.get(name);
    if (!entry || entry.expiresAt > now) return entry;
    this.entries.delete(name);
    this.bytes -= entry.bytes;
    return undefined;
  }

  /**
   * What to hand `set` with a record about to be read from the store: the cache's state before
   * the read.
   */
  get generation(): number {
    return this.drops;
  }

  /**
   * Caches `record`. With `readAt` (the `generation` before it was read), not if a record was
   * dropped since: an operator may have deleted this one between the read and now.
   */
  set(id: RecordId, record: CachedRecord, readAt?: number): void {
    if (this.suspended || (readAt !== undefined && readAt !== this.drops)) return;
    const bytes = sizeOf(record.response);
    if (bytes > this.maxBytes / 16) return;
    const name = recordName(id);
    const previous = this.entries.get(name);
    if (previous) {
      this.entries.delete(name);
      this.bytes -= previous.bytes;
    }
    this.entries.set(name, { ...record, id, bytes });
    this.bytes += bytes;
    if (this.firstUse) {
      const firstUse = this.firstUse;
      this.firstUse = undefined;
      firstUse();
    }
    for (const [oldest, entry] of this.entries) {
      if (this.entries.size <= this.maxEntries && this.bytes <= this.maxBytes) break;
      this.entries.delete(oldest);
      this.bytes -= entry.bytes;
    }
  }

  /**
   * Calls `callback` once, when the first record is cached (at once if one is): a process that
   * never replays opens no connection to hear about invalidations.
   */
  onFirstUse(callback: () => void): void {
    if (this.entries.size > 0) callback();
    else this.firstUse = callback;
  }

  /** Drops the record of `id`, if it is cached. */
  delete(id: RecordId): void {
    this.drops++;
    const name = recordName(id);
    const entry = this.entries.get(name);
    if (!entry) return;
    this.entries.delete(name);
    this.bytes -= entry.bytes;
  }

  /** Drops every cached record whose id `matches`. */
  deleteWhere(matches: (id: RecordId) => boolean): void {
    this.drops++;
    for (const [name, entry] of this.entries) {
      if (!matches(entry.id)) continue;
      this.entries.delete(name);
      this.bytes -= entry.bytes;
    }
  }

  /**
   * Keeps each record cached now only if `stillStored` confirms it (a failed check drops it):
   * for the records cached before this process heard about deletions, so a record an operator
   * deleted meanwhile is not replayed, while those still stored keep answering.
   */
  async revalidate(
    stillStored: (id: RecordId, record: CachedRecord) => Promise<boolean>,
  ): Promise<void> {
    const cached = [...this.entries.entries()];
    await Promise.all(
      cached.map(async ([name, entry]) => {
        const kept = await stillStored(entry.id, entry).catch(() => false);
        if (kept || this.entries.get(name) !== entry) return;
        this.entries.delete(name);
        this.bytes -= entry.bytes;
      }),
    );
  }

  /** Drops every cached record. */
  clear(): void {
    this.drops++;
    this.entries.clear();
    this.bytes = 0;
  }

  /**
   * Drops every cached record and caches none until `resume`: while the store's listening
   * connection is lost, a record an operator deletes would otherwise be replayed.
   */
  suspend(): void {
    this.clear();
    this.suspended = true;
  }

  /** Caches again (after `suspend`). */
  resume(): void {
    this.suspended = false;
  }
}

/** Drops the records an invalidation names (see `IdempotencyStore.onInvalidated`). */
export function invalidate(cache: ReplayCache, invalidation: RecordInvalidation): void {
  if (!invalidation.all) cache.deleteWhere(invalidation.matches);
  else if (invalidation.listening === false) cache.suspend();
  else {
    cache.clear();
    cache.resume();
  }
}

function sizeOf(response: StoredResponse): number {
  let bytes = 64 + (response.body?.length ?? 0);
  for (const [name, value] of Object.entries(response.headers)) {
    bytes += name.length + (Array.isArray(value) ? value.join('').length : String(value).length);
  }
  return bytes;
}
