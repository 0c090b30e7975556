import type {
  ClaimRequest,
  ClaimResult,
  Lease,
  RecordSnapshot,
  StoredResponse,
} from '../storage/idempotency-store.interface.js';
import { StoreTimeoutError } from './key-errors.js';
import { KeyEvents, type KeyEvent } from './key-events.js';
import { decisionOf, KEY_TRANSITIONS, KeyStateMachine } from './key-state-machine.js';
import type { BeginRequest } from './types.js';

const ID = { scope: '', endpoint: 'POST /t', key: 'k' };
const RESPONSE: StoredResponse = {
  status: 201,
  headers: {},
  body: '{"ok":true}',
  bodyEncoding: 'json',
  isError: false,
};
const LEASE: Lease = { id: ID, token: 't-1' };
const open = (_record: RecordSnapshot, stored: StoredResponse) => stored;

function recordOf(overrides: Partial<RecordSnapshot>): ClaimResult {
  return {
    claimed: false,
    record: {
      state: 'completed',
      fingerprint: 'fp',
      token: 't-0',
      expiresAt: 2_000,
      response: RESPONSE,
      ...overrides,
    },
  };
}

describe('decisionOf (the transitions a claim leads to)', () => {
  it('a won claim executes, its lease bound to the fingerprint (and watched in wait mode)', () => {
    const claim: ClaimResult = { claimed: true, lease: LEASE, takeover: false };
    expect(decisionOf(claim, 'fp', 1_000, open)).toEqual({
      action: 'execute',
      lease: { ...LEASE, fingerprint: 'fp' },
    });
    expect(decisionOf(claim, 'fp', 1_000, open, true)).toEqual({
      action: 'execute',
      lease: { ...LEASE, fingerprint: 'fp', watched: true },
    });
  });

  it('another payload is a mismatch, whether the key is completed or running', () => {
    expect(decisionOf(recordOf({}), 'other', 1_000, open)).toEqual({ action: 'mismatch' });
    expect(
      decisionOf(recordOf({ state: 'in_progress', response: null }), 'other', 1_000, open),
    ).toEqual({ action: 'mismatch' });
  });

  it('a completed record replays, or is unreadable when its response cannot be opened', () => {
    expect(decisionOf(recordOf({}), 'fp', 1_000, open)).toEqual({
      action: 'replay',
      response: RESPONSE,
    });
    expect(decisionOf(recordOf({}), 'fp', 1_000, () => undefined)).toEqual({
      action: 'unreadable',
    });
  });

  it('a running record is in progress until its lock runs out', () => {
    const running = recordOf({ state: 'in_progress', response: null, expiresAt: 1_750 });
    expect(decisionOf(running, 'fp', 1_000, open)).toEqual({
      action: 'in-progress',
      retryAfterMs: 750,
    });
    expect(decisionOf(running, 'fp', 2_000, open)).toEqual({
      action: 'in-progress',
      retryAfterMs: 0,
    });
  });

  it('every state has a way out, and only a claim leaves "absent"', () => {
    const from = new Set(KEY_TRANSITIONS.map(([state]) => state));
    expect([...from].sort()).toEqual(['absent', 'completed', 'in_progress']);
    expect(KEY_TRANSITIONS.filter(([state]) => state === 'absent')).toEqual([
      ['absent', 'claim', 'in_progress'],
    ]);
  });
});

describe('KeyStateMachine', () => {
  const request: BeginRequest = {
    id: ID,
    fingerprint: 'fp',
    lockTimeoutMs: 1_000,
    concurrency: 'reject',
    waitTimeoutMs: 0,
  };
  const settings = {
    waitPollIntervalMs: 10,
    storeTimeoutMs: 50,
    sealer: undefined,
    replayCache: undefined,
  };

  function machineWith(claim: (request: ClaimRequest) => Promise<ClaimResult>) {
    const events = new KeyEvents();
    const seen: KeyEvent[] = [];
    events.subscribe((event) => seen.push(event));
    const released: Lease[] = [];
    const store = {
      claim,
      release: (lease: Lease) => {
        released.push(lease);
        return Promise.resolve(true);
      },
    };
    return { machine: new KeyStateMachine(store, settings, events), seen, released };
  }

  it('tells the final decision and a takeover as events', async () => {
    const { machine, seen } = machineWith((claim) =>
      Promise.resolve({
        claimed: true,
        lease: { id: claim.id, token: claim.token },
        takeover: true,
      }),
    );
    const decision = await machine.begin(request);
    expect(decision.action).toBe('execute');
    expect(seen).toEqual([
      { type: 'taken-over', id: ID },
      { type: 'decided', id: ID, action: 'execute' },
    ]);
  });

  it('a claim the store answers after storeTimeout is refused, then released when it lands', async () => {
    let land!: (result: ClaimResult) => void;
    const { machine, seen, released } = machineWith(
      () => new Promise<ClaimResult>((resolve) => (land = resolve)),
    );
    await expect(machine.begin(request)).rejects.toBeInstanceOf(StoreTimeoutError);
    land({ claimed: true, lease: LEASE, takeover: false });
    await new Promise((resolve) => setImmediate(resolve));
    expect(released).toEqual([LEASE]);
    expect(seen).toEqual([{ type: 'late-claim-released', id: ID }]);
  });

  it('a claim whose connection died is tried once more with the same token', async () => {
    const tokens: string[] = [];
    const { machine } = machineWith((claim) => {
      tokens.push(claim.token);
      if (tokens.length === 1)
        return Promise.reject(Object.assign(new Error('reset'), { code: 'ECONNRESET' }));
      return Promise.resolve({
        claimed: true,
        lease: { id: ID, token: claim.token },
        takeover: false,
      });
    });
    expect((await machine.begin(request)).action).toBe('execute');
    expect(tokens).toHaveLength(2);
    expect(tokens[1]).toBe(tokens[0]);
  });
});
