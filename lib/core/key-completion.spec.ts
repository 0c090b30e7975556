import type { Lease, LeaseState, StoredResponse } from '../storage/idempotency-store.interface.js';
import { KeyCompletion } from './key-completion.js';
import { KeyEvents, type KeyEvent } from './key-events.js';

const LEASE: Lease = {
  id: { scope: '', endpoint: 'POST /t', key: 'k' },
  token: 't',
  fingerprint: 'f',
};
const RESPONSE: StoredResponse = {
  status: 200,
  headers: {},
  body: null,
  bodyEncoding: 'json',
  isError: false,
};

/** A store that answers each call from a script: a value, or an error to throw. */
function scriptedStore(script: {
  complete?: (boolean | Error)[];
  release?: (boolean | Error)[];
  leaseState?: LeaseState;
}) {
  const calls: string[] = [];
  const next = (name: 'complete' | 'release') => {
    calls.push(name);
    const answer = script[name]?.shift() ?? true;
    return answer instanceof Error ? Promise.reject(answer) : Promise.resolve(answer);
  };
  return {
    calls,
    complete: () => next('complete'),
    release: () => next('release'),
    leaseState: script.leaseState ? () => Promise.resolve(script.leaseState!) : undefined,
  };
}

function completionWith(store: ReturnType<typeof scriptedStore>) {
  const events = new KeyEvents();
  const seen: KeyEvent[] = [];
  events.subscribe((event) => seen.push(event));
  return { completion: new KeyCompletion(store, 1_000, undefined, events, [0, 0, 0]), seen };
}

describe('KeyCompletion', () => {
  it('retries a failed write, and gives up after the last attempt without throwing', async () => {
    const store = scriptedStore({ complete: [new Error('a'), new Error('b'), new Error('c')] });
    const { completion, seen } = completionWith(store);
    await expect(completion.complete(LEASE, RESPONSE, 1_000)).resolves.toBeUndefined();
    expect(store.calls).toEqual(['complete', 'complete', 'complete']);
    expect(seen).toEqual([
      {
        type: 'write-failed',
        id: LEASE.id,
        what: 'store the response of',
        attempts: 3,
        error: new Error('c'),
      },
    ]);
  });

  it('a retry that finds the response stored under its lease counts as stored', async () => {
    const store = scriptedStore({
      complete: [new Error('lost answer'), false],
      leaseState: 'completed',
    });
    const { completion, seen } = completionWith(store);
    await completion.complete(LEASE, RESPONSE, 1_000);
    expect(seen).toEqual([]);
  });

  it('a completion that finds the lease taken reports it lost, once per renewal', async () => {
    const store = scriptedStore({ complete: [false, false] });
    const { completion, seen } = completionWith(store);
    const renewal = { stopped: false, settling: true, lostReported: false, stop: () => undefined };
    await completion.complete(LEASE, RESPONSE, 1_000, renewal);
    await completion.complete(LEASE, RESPONSE, 1_000, renewal);
    expect(seen).toEqual([
      { type: 'lease-lost', id: LEASE.id, consequence: 'its response was not stored' },
    ]);
  });

  it('a release is told; one that finds the record completed after a lost COMMIT answer is not lost', async () => {
    const released = completionWith(scriptedStore({}));
    await released.completion.release(LEASE);
    expect(released.seen).toEqual([{ type: 'released', id: LEASE.id }]);
    const committed = completionWith(scriptedStore({ release: [false], leaseState: 'completed' }));
    await committed.completion.release(LEASE, undefined, undefined, true);
    expect(committed.seen).toEqual([{ type: 'commit-answer-lost', id: LEASE.id }]);
  });
});
