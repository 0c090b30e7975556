import { Logger } from '@nestjs/common';
import { ReplayCache, type CachedRecord } from '../replay-cache.js';
import type {
  IdempotencyStore,
  RecordDetails,
  RecordId,
  RecordInvalidation,
} from '../storage/idempotency-store.interface.js';
import { IdempotencyAdmin } from './idempotency-admin.service.js';

const record: CachedRecord = {
  fingerprint: 'fp',
  token: 'token',
  expiresAt: Date.now() + 60_000,
  response: { status: 201, headers: {}, body: '{}', bodyEncoding: 'json', isError: false },
};
const idOf = (key: string): RecordId => ({ scope: '', endpoint: 'POST /orders', key });

/**
 * A store of one's own whose listening the test reports by hand (`tell`), in any order the
 * interface allows; `findRecords` (the first listen's check) answers when the test says
 * (`answer`), with every record still stored.
 */
function storeTelling() {
  let listener: ((invalidation: RecordInvalidation) => void) | undefined;
  const checks: (() => void)[] = [];
  const store = {
    onInvalidated(added: (invalidation: RecordInvalidation) => void) {
      listener = added;
      return () => (listener = undefined);
    },
    findRecords({ scope, endpoint, key }: { scope: string; endpoint: string; key: string }) {
      return new Promise<RecordDetails[]>((resolve) =>
        checks.push(() =>
          resolve([{ ...record, id: { scope, endpoint, key }, state: 'completed', createdAt: 0 }]),
        ),
      );
    },
  };
  return {
    store: store as unknown as IdempotencyStore,
    tell: (invalidation: RecordInvalidation) => {
      if (!listener) throw new Error('nobody listens');
      listener(invalidation);
    },
    /** Answers the checks asked so far, and lets what follows them run. */
    answer: async () => {
      for (const check of checks.splice(0)) check();
      await new Promise((resolve) => setImmediate(resolve));
    },
  };
}

/** An admin whose cache holds one record, so it listens (it starts on the first record cached). */
function adminListening() {
  const told = storeTelling();
  const cache = new ReplayCache();
  const admin = new IdempotencyAdmin(told.store, { replayCache: cache, sealer: undefined });
  admin.onApplicationBootstrap();
  cache.set(idOf('first'), record);
  return { ...told, cache, admin };
}

describe('IdempotencyAdmin and the replay cache', () => {
  // Its debug lines (Nest's default logger, outside an app) say nothing the checks do not.
  beforeAll(() => {
    Logger.overrideLogger(false);
  });

  it('caches again once the store listens, when it reported a loss before it ever listened', async () => {
    const { cache, tell, answer, admin } = adminListening();
    // E.g. a store that reports a failed first connect, or a connection lost before the admin
    // heard it listen.
    tell({ all: true, listening: false });
    expect(cache.get(idOf('first'), Date.now())).toBeUndefined();
    cache.set(idOf('while lost'), record);
    expect(cache.get(idOf('while lost'), Date.now())).toBeUndefined();

    tell({ all: true, listening: true });
    await answer();
    // Before the fix the first listen only checked the (empty) cache and never resumed it: it
    // cached nothing from then on.
    cache.set(idOf('after'), record);
    expect(cache.get(idOf('after'), Date.now())).toEqual(expect.objectContaining(record));
    admin.onApplicationShutdown();
  });

  it('a loss during the first listen’s check is not undone when the check ends', async () => {
    const { cache, tell, answer, admin } = adminListening();
    tell({ all: true, listening: true }); // the check of 'first' starts
    tell({ all: true, listening: false });
    await answer();
    expect(cache.get(idOf('first'), Date.now())).toBeUndefined();
    // Still lost: a record cached now could be deleted by an operator unheard.
    cache.set(idOf('while lost'), record);
    expect(cache.get(idOf('while lost'), Date.now())).toBeUndefined();

    tell({ all: true, listening: true });
    cache.set(idOf('after'), record);
    expect(cache.get(idOf('after'), Date.now())).toEqual(expect.objectContaining(record));
    admin.onApplicationShutdown();
  });
});
