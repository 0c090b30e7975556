import { jest } from '@jest/globals';
import type { Lease } from '../storage/idempotency-store.interface.js';
import { KeyEvents, type KeyEvent } from './key-events.js';
import { LeaseKeeper } from './lease-keeper.js';

const TERMS = { lockTimeoutMs: 300, lockRenewalLimitMs: 10_000 };

function leaseOf(key: string): Lease {
  return { id: { scope: '', endpoint: 'POST /t', key }, token: `token-${key}` };
}

/** A store whose `renew` answers as told, recording each call and the beat it came in. */
function fakeStore(answer: (lease: Lease) => Promise<boolean> = () => Promise.resolve(true)) {
  const calls: { key: string; lockedUntil: number; at: number }[] = [];
  return {
    calls,
    renew(lease: Lease, lockedUntil: number) {
      calls.push({ key: lease.id.key, lockedUntil, at: Date.now() });
      return answer(lease);
    },
  };
}

function keeperWith(store: ReturnType<typeof fakeStore>, storeTimeoutMs = 5_000) {
  const events = new KeyEvents();
  const seen: KeyEvent[] = [];
  events.subscribe((event) => seen.push(event));
  return { keeper: new LeaseKeeper(store, storeTimeoutMs, events), seen };
}

const typesOf = (seen: KeyEvent[]) => seen.map((event) => event.type);

describe('LeaseKeeper', () => {
  beforeEach(() => jest.useFakeTimers({ now: 1_000_000 }));
  afterEach(() => jest.useRealTimers());

  it('renews every running lease from one timer, all in the same beat', async () => {
    const store = fakeStore();
    const { keeper } = keeperWith(store);
    for (const key of ['a', 'b', 'c']) keeper.hold(leaseOf(key), TERMS);
    expect(jest.getTimerCount()).toBe(1);
    await jest.advanceTimersByTimeAsync(100);
    expect(store.calls.map((call) => call.key)).toEqual(['a', 'b', 'c']);
    expect(new Set(store.calls.map((call) => call.at)).size).toBe(1);
    expect(store.calls[0].lockedUntil).toBe(store.calls[0].at + TERMS.lockTimeoutMs);
    await jest.advanceTimersByTimeAsync(100);
    expect(store.calls).toHaveLength(6);
    expect(keeper.held).toBe(3);
  });

  it('renews a lease claimed just before a beat at that beat: none waits longer than an interval', async () => {
    const store = fakeStore();
    const { keeper } = keeperWith(store);
    keeper.hold(leaseOf('old'), TERMS);
    await jest.advanceTimersByTimeAsync(90);
    keeper.hold(leaseOf('young'), TERMS);
    await jest.advanceTimersByTimeAsync(10);
    expect(store.calls.map((call) => call.key)).toEqual(['old', 'young']);
    await jest.advanceTimersByTimeAsync(100);
    expect(store.calls.map((call) => call.key)).toEqual(['old', 'young', 'old', 'young']);
  });

  it('keeps one timer per renewal interval', () => {
    const { keeper } = keeperWith(fakeStore());
    keeper.hold(leaseOf('a'), TERMS);
    keeper.hold(leaseOf('b'), TERMS);
    keeper.hold(leaseOf('c'), { ...TERMS, lockTimeoutMs: 600 });
    expect(jest.getTimerCount()).toBe(2);
  });

  it('stops renewing a stopped lease, and an idle timer stops itself at its next beat', async () => {
    const store = fakeStore();
    const { keeper } = keeperWith(store);
    const renewal = keeper.hold(leaseOf('a'), TERMS);
    renewal.stop();
    expect(renewal.stopped).toBe(true);
    expect(keeper.held).toBe(0);
    await jest.advanceTimersByTimeAsync(100);
    expect(store.calls).toHaveLength(0);
    expect(jest.getTimerCount()).toBe(0);
  });

  it('does not renew at all when renewal is off for the route', () => {
    const { keeper } = keeperWith(fakeStore());
    expect(keeper.hold(leaseOf('a'), { ...TERMS, lockRenewalLimitMs: 0 }).stopped).toBe(true);
    expect(jest.getTimerCount()).toBe(0);
  });

  it('stops at the renewal limit and reports it, unless the result is being stored', async () => {
    const store = fakeStore();
    const { keeper, seen } = keeperWith(store);
    const hung = keeper.hold(leaseOf('hung'), { ...TERMS, lockRenewalLimitMs: 250 });
    const storing = keeper.hold(leaseOf('storing'), { ...TERMS, lockRenewalLimitMs: 250 });
    storing.settling = true;
    await jest.advanceTimersByTimeAsync(300);
    expect(hung.stopped).toBe(true);
    expect(storing.stopped).toBe(false);
    expect(store.calls.filter((call) => call.key === 'hung')).toHaveLength(2);
    expect(seen).toEqual([
      {
        type: 'renewal-limit',
        id: leaseOf('hung').id,
        lockRenewalLimitMs: 250,
        lockTimeoutMs: 300,
      },
    ]);
  });

  it('reports a lost lease once and stops; a settling lease found gone is not lost', async () => {
    const store = fakeStore(() => Promise.resolve(false));
    const { keeper, seen } = keeperWith(store);
    const lost = keeper.hold(leaseOf('lost'), TERMS);
    const settling = keeper.hold(leaseOf('settling'), TERMS);
    settling.settling = true;
    await jest.advanceTimersByTimeAsync(200);
    expect(lost.stopped).toBe(true);
    expect(lost.lostReported).toBe(true);
    expect(seen.filter((event) => event.type === 'lease-lost')).toEqual([
      { type: 'lease-lost', id: leaseOf('lost').id, consequence: 'its result will not be stored' },
    ]);
    expect(store.calls.filter((call) => call.key === 'lost')).toHaveLength(1);
  });

  it('goes on renewing when the store does not answer, reports the failure and the lapse', async () => {
    const store = fakeStore(() => new Promise<boolean>(() => undefined));
    const { keeper, seen } = keeperWith(store, 150);
    const renewal = keeper.hold(leaseOf('a'), TERMS);
    await jest.advanceTimersByTimeAsync(300);
    // Beats at 100, 200 and 300: none answered, none holds the next back.
    expect(store.calls).toHaveLength(3);
    expect(typesOf(seen)).toEqual(['renewal-failed', 'renewal-lapsed']);
    await jest.advanceTimersByTimeAsync(300);
    expect(typesOf(seen).filter((type) => type === 'renewal-lapsed')).toHaveLength(1);
    expect(renewal.stopped).toBe(false);
  });

  it('a renewal that throws is a failed renewal, not a thrown beat', async () => {
    const store = fakeStore(() => {
      throw new Error('connection reset');
    });
    const { keeper, seen } = keeperWith(store);
    keeper.hold(leaseOf('a'), TERMS);
    await jest.advanceTimersByTimeAsync(100);
    expect(seen).toEqual([
      { type: 'renewal-failed', id: leaseOf('a').id, error: new Error('connection reset') },
    ]);
  });

  it('stops everything on stopAll (the app closed)', async () => {
    const store = fakeStore();
    const { keeper } = keeperWith(store);
    const a = keeper.hold(leaseOf('a'), TERMS);
    keeper.hold(leaseOf('b'), { ...TERMS, lockTimeoutMs: 600 });
    keeper.stopAll();
    expect(a.stopped).toBe(true);
    expect(jest.getTimerCount()).toBe(0);
    await jest.advanceTimersByTimeAsync(1_000);
    expect(store.calls).toHaveLength(0);
  });
});

describe('LeaseKeeper under review', () => {
  beforeEach(() => jest.useFakeTimers({ now: 1_000_000 }));
  afterEach(() => jest.useRealTimers());

  it('leaves no timer behind once every renewal of a beat was answered (nor anything of a finished lease)', async () => {
    // storeTimeout far above the interval, as with lockTimeout '3s' and storeTimeout '30s'.
    const store = fakeStore();
    const { keeper } = keeperWith(store, 60_000);
    const renewal = keeper.hold(leaseOf('a'), TERMS);
    await jest.advanceTimersByTimeAsync(1_000);
    expect(store.calls).toHaveLength(10);
    // Every renewal was answered at once: only the beat's own timer is left.
    expect(jest.getTimerCount()).toBe(1);
    renewal.stop();
    await jest.advanceTimersByTimeAsync(100);
    expect(jest.getTimerCount()).toBe(0);
  });

  it('a store whose renew answers without a promise does not throw out of the beat nor starve the leases after it', async () => {
    // A store written in JavaScript (or typed `any`): it passes the store contract, which awaits.
    const store = {
      calls: [] as string[],
      renew(lease: Lease) {
        this.calls.push(lease.id.key);
        return true as unknown as Promise<boolean>;
      },
    };
    const events = new KeyEvents();
    const keeper = new LeaseKeeper(store, 5_000, events);
    const seen: KeyEvent[] = [];
    events.subscribe((event) => seen.push(event));
    keeper.hold(leaseOf('a'), TERMS);
    keeper.hold(leaseOf('b'), TERMS);
    await jest.advanceTimersByTimeAsync(200);
    expect(store.calls).toEqual(['a', 'b', 'a', 'b']);
    expect(seen).toEqual([]);
    keeper.stopAll();
  });
});
