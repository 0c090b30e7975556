import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import type {
  ClaimResult,
  IdempotencyStore,
  Lease,
  RecordId,
  RecordInvalidation,
  StoredResponse,
} from '../storage/idempotency-store.interface.js';

/** What the contract needs to know about the store under test. */
export interface StoreContractOptions {
  /**
   * The store deletes expired records by itself (Redis expiry) rather than in `purgeExpired`: the
   * purge check then only requires that `purgeExpired` never deletes a live record.
   * @default false
   */
  readonly expiresByItself?: boolean;
  /**
   * Concurrent claims of the claim-race check.
   * @default 20
   */
  readonly racers?: number;
  /**
   * How long the `onInvalidated` checks wait for the store to tell a listener something (its
   * listening connection to open, a deletion to arrive), in milliseconds. Below the default test
   * timeouts of Jest (5 s) and Mocha (2 s), so a store that stays silent fails with the kit's
   * message; raise it (and the runner's timeout) for a store that takes longer to listen.
   * @default 1500
   */
  readonly invalidationTimeoutMs?: number;
  /**
   * Whether the store's `onInvalidated` can start listening where the checks run. `false` (behind
   * PgBouncer in transaction mode without a `listenerUrl`, say: it never listens, and tells
   * nothing): the `onInvalidated` checks only check that nothing is told during the call.
   * @default true
   */
  readonly listens?: boolean;
}

/** One check of the contract: a name for the test runner, and the check (rejects on failure). */
export interface StoreCheck {
  /** The check's name, for `it(check.name, …)` or `test(check.name, …)`. */
  readonly name: string;
  /** Runs the check against the store; rejects with what the store got wrong. */
  run(): Promise<void>;
}

const MINUTE = 60_000;

/**
 * The contract every `IdempotencyStore` must meet, as a list of checks that any test runner can
 * run (each rejects with an `AssertionError` on failure):
 *
 * ```ts
 * import { storeContract } from 'nestjs-idempotency/testing';
 * describe('my store', () => {
 *   for (const check of storeContract(() => myStore)) it(check.name, () => check.run());
 * });
 * // node:test: for (const check of storeContract(() => myStore)) test(check.name, () => check.run());
 * ```
 *
 * Each check works on records of its own (a fresh endpoint), so the store may be shared with other
 * tests and between checks, and checks may run concurrently. Times are given to the store, as the
 * module does, so expiry is checked without waiting; only the purge check uses records that expired
 * before the real current time (a purge with a future time would delete other tests' live records).
 */
export function storeContract(
  store: () => IdempotencyStore | Promise<IdempotencyStore>,
  options: StoreContractOptions = {},
): StoreCheck[] {
  const racers = options.racers ?? 20;
  const invalidationTimeoutMs = options.invalidationTimeoutMs ?? 1500;
  const heard = () => new Heard(invalidationTimeoutMs);
  const check = (name: string, body: (subject: Subject) => Promise<void>): StoreCheck => ({
    name,
    run: async () => body(new Subject(await store())),
  });

  return [
    check('claims a new key, and a second claim finds it in progress', async (s) => {
      const id = s.id();
      const first = await s.claim(id, 'fp-a');
      assert.equal(first.claimed, true);
      assert.equal(first.claimed && first.takeover, false);
      const second = await s.claim(id, 'fp-a');
      assert.equal(second.claimed, false, 'a held key must not be claimed twice');
      if (second.claimed) return;
      assert.equal(second.record.state, 'in_progress');
      assert.equal(second.record.fingerprint, 'fp-a');
      assert.equal(second.record.expiresAt, s.now + MINUTE);
      assert.equal(second.record.response, null);
    }),

    check(`lets exactly one of ${racers} concurrent claims of a key win`, async (s) => {
      const id = s.id();
      const results = await Promise.all(
        Array.from({ length: racers }, () => s.claim(id, 'fp-race')),
      );
      assert.equal(results.filter((result) => result.claimed).length, 1);
      for (const result of results) {
        if (!result.claimed) assert.equal(result.record.fingerprint, 'fp-race');
      }
    }),

    check('lets exactly one of concurrent claims with different payloads win', async (s) => {
      const id = s.id();
      const results = await Promise.all(
        Array.from({ length: racers }, (_, i) => s.claim(id, `fp-${i}`)),
      );
      const winners = results.filter((result) => result.claimed);
      assert.equal(winners.length, 1);
    }),

    check('decides concurrent claims and completions of many keys each on its own', async (s) => {
      // Four kinds of record, claimed all at once: new, completed, held by another payload, abandoned.
      // Characters that quoting or escaping gets wrong, when statements carry several ids at once.
      const awkward = ['"', "'", '\\', '{', '}', ',', 'NULL', ' 🔑 ', 'é'];
      const fresh = Array.from({ length: 8 }, (_, i) => {
        const id = s.id();
        return { ...id, scope: awkward[i], key: `${id.key}${awkward[i + 1]}` };
      });
      const completed = Array.from({ length: 8 }, () => s.id());
      const held = Array.from({ length: 8 }, () => s.id());
      const abandoned = Array.from({ length: 8 }, () => s.id());
      const responses = new Map<RecordId, StoredResponse>();
      for (const id of completed) {
        const lease = await s.leaseOf(id, 'fp-a');
        const response = sampleResponse();
        responses.set(id, response);
        assert.equal(await s.store.complete(lease, response, s.now + 10 * MINUTE), true);
      }
      for (const id of held) await s.leaseOf(id, 'fp-a');
      const stale: Lease[] = [];
      for (const id of abandoned) stale.push(await s.leaseOf(id, 'fp-a'));
      // Past every lock (the held records keep their payload: another one is still refused).
      const later = s.now + MINUTE + 1;
      const [freshClaims, completedClaims, heldClaims, abandonedClaims] = await Promise.all([
        Promise.all(fresh.map((id) => s.claim(id, 'fp-a', later))),
        Promise.all(completed.map((id) => s.claim(id, 'fp-a', later))),
        Promise.all(held.map((id) => s.claim(id, 'fp-b', later))),
        Promise.all(abandoned.map((id) => s.claim(id, 'fp-a', later))),
      ]);
      for (const claim of freshClaims)
        assert.equal(claim.claimed && !claim.takeover, true, 'a new key was not claimed as new');
      freshClaims.forEach((claim, i) =>
        assert.deepEqual(claim.claimed && claim.lease.id, fresh[i]),
      );
      completedClaims.forEach((claim, i) => {
        assert.equal(claim.claimed, false);
        if (!claim.claimed) assert.deepEqual(claim.record.response, responses.get(completed[i]));
      });
      for (const claim of heldClaims)
        assert.equal(!claim.claimed && claim.record.fingerprint, 'fp-a');
      for (const claim of abandonedClaims)
        assert.equal(
          claim.claimed && claim.takeover,
          true,
          'an abandoned claim was not taken over',
        );
      // All at once: the new leases complete, the stale ones of the taken-over records do not.
      const leases = [...freshClaims, ...abandonedClaims].map(
        (claim) => (claim.claimed ? claim.lease : undefined)!,
      );
      const outcomes = await Promise.all([
        ...leases.map((lease) => s.store.complete(lease, sampleResponse(), s.now + 10 * MINUTE)),
        ...stale.map((lease) => s.store.complete(lease, sampleResponse(), s.now + 10 * MINUTE)),
      ]);
      assert.deepEqual(outcomes, [...leases.map(() => true), ...stale.map(() => false)]);
      // Each stored under its own id, exactly as given.
      const reads = await Promise.all(fresh.map((id) => s.claim(id, 'fp-a', later + 1)));
      for (const read of reads) assert.equal(!read.claimed && read.record.state, 'completed');
    }),

    check('stores a completed response and returns it exactly, until its expiry', async (s) => {
      const id = s.id();
      const lease = await s.leaseOf(id, 'fp-a');
      const response = sampleResponse();
      assert.equal(await s.store.complete(lease, response, s.now + 10 * MINUTE), true);
      const read = await s.claim(id, 'fp-a', s.now + 5 * MINUTE);
      assert.equal(read.claimed, false, 'a completed record must not be claimed before its expiry');
      if (read.claimed) return;
      assert.equal(read.record.state, 'completed');
      assert.equal(read.record.expiresAt, s.now + 10 * MINUTE);
      assert.deepEqual(read.record.response, response);
    }),

    check(
      "reads a record back with the token of the claim that holds it, and keeps the completing claim's token",
      async (s) => {
        // Encrypted responses are bound to the claim that completed them (one token per lifetime
        // of the key): a store that drops or replaces the token on completion makes them unreadable.
        const id = s.id();
        const first = await s.leaseOf(id, 'fp-a');
        const held = await s.claim(id, 'fp-a');
        assert.equal(!held.claimed && held.record.token, first.token);
        const takeover = await s.claim(id, 'fp-a', s.now + MINUTE + 1);
        assert.equal(takeover.claimed, true);
        if (!takeover.claimed) return;
        assert.notEqual(takeover.lease.token, first.token);
        const response = sampleResponse();
        assert.equal(await s.store.complete(takeover.lease, response, s.now + 10 * MINUTE), true);
        const read = await s.claim(id, 'fp-a', s.now + 2 * MINUTE);
        assert.equal(read.claimed, false);
        if (read.claimed) return;
        assert.equal(read.record.state, 'completed');
        assert.equal(
          read.record.token,
          takeover.lease.token,
          'a completed record must keep the token of the claim that completed it',
        );
      },
    ),

    check(
      'fences the lease: complete, renew and release with another token do nothing',
      async (s) => {
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        const forged: Lease = { id, token: randomUUID() };
        assert.equal(await s.store.complete(forged, sampleResponse(), s.now + MINUTE), false);
        assert.equal(await s.store.renew(forged, s.now + 5 * MINUTE), false);
        assert.equal(await s.store.release(forged), false);
        const read = await s.claim(id, 'fp-a');
        assert.equal(!read.claimed && read.record.state, 'in_progress');
        assert.equal(!read.claimed && read.record.expiresAt, s.now + MINUTE);
        assert.equal(await s.store.complete(lease, sampleResponse(), s.now + MINUTE), true);
      },
    ),

    check(
      'keeps a completed record final: no second completion, release or renewal, whatever the payload',
      async (s) => {
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        const response = sampleResponse();
        assert.equal(await s.store.complete(lease, response, s.now + 10 * MINUTE), true);
        assert.equal(
          await s.store.complete(lease, { ...response, status: 500 }, s.now + 20 * MINUTE),
          false,
        );
        assert.equal(await s.store.renew(lease, s.now + 20 * MINUTE), false);
        assert.equal(await s.store.release(lease), false);
        const other = await s.claim(id, 'fp-b', s.now + 9 * MINUTE);
        assert.equal(other.claimed, false);
        if (other.claimed) return;
        assert.equal(other.record.fingerprint, 'fp-a');
        assert.deepEqual(other.record.response, response);
      },
    ),

    check('renews a held lock, so a claim after the old lock finds it in progress', async (s) => {
      const id = s.id();
      const lease = await s.leaseOf(id, 'fp-a');
      assert.equal(await s.store.renew(lease, s.now + 3 * MINUTE), true);
      const read = await s.claim(id, 'fp-a', s.now + 2 * MINUTE);
      assert.equal(read.claimed, false, 'a renewed lock must hold until its new end');
      assert.equal(!read.claimed && read.record.expiresAt, s.now + 3 * MINUTE);
      assert.equal(await s.store.complete(lease, sampleResponse(), s.now + 10 * MINUTE), true);
    }),

    check(
      'never moves a lock back: a renewal that lands after a later one leaves it',
      async (s) => {
        // A renewal stalled on its connection while the next ones went through, landing last.
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        assert.equal(await s.store.renew(lease, s.now + 3 * MINUTE), true);
        assert.equal(
          await s.store.renew(lease, s.now + 2 * MINUTE),
          true,
          'the lease is still held',
        );
        const read = await s.claim(id, 'fp-a', s.now + 2 * MINUTE + 1);
        assert.equal(read.claimed, false, 'the lock must hold until the end the later renewal set');
        assert.equal(!read.claimed && read.record.expiresAt, s.now + 3 * MINUTE);
      },
    ),

    check(
      'takes an abandoned claim over for the same payload once its lock ended, and fences the old lease off',
      async (s) => {
        const id = s.id();
        const abandoned = await s.leaseOf(id, 'fp-a');
        const takeover = await s.claim(id, 'fp-a', s.now + MINUTE + 1);
        assert.equal(takeover.claimed, true);
        if (!takeover.claimed) return;
        assert.equal(takeover.takeover, true);
        assert.equal(
          await s.store.complete(abandoned, sampleResponse(), s.now + 10 * MINUTE),
          false,
        );
        assert.equal(await s.store.renew(abandoned, s.now + 10 * MINUTE), false);
        assert.equal(await s.store.release(abandoned), false);
        assert.equal(
          await s.store.complete(takeover.lease, sampleResponse(), s.now + 10 * MINUTE),
          true,
        );
      },
    ),

    check(
      'keeps an abandoned claim bound to its payload: another payload is refused, not taken over',
      async (s) => {
        const id = s.id();
        await s.leaseOf(id, 'fp-a');
        const other = await s.claim(id, 'fp-b', s.now + MINUTE + 1);
        assert.equal(other.claimed, false);
        assert.equal(!other.claimed && other.record.fingerprint, 'fp-a');
      },
    ),

    check('takes a completed record over, for any payload, once its TTL ended', async (s) => {
      const id = s.id();
      const lease = await s.leaseOf(id, 'fp-a');
      assert.equal(await s.store.complete(lease, sampleResponse(), s.now + 2 * MINUTE), true);
      const later = await s.claim(id, 'fp-b', s.now + 2 * MINUTE + 1);
      assert.equal(later.claimed, true);
      assert.equal(later.claimed && later.takeover, true);
      const read = await s.claim(id, 'fp-b', s.now + 2 * MINUTE + 2);
      assert.equal(!read.claimed && read.record.state, 'in_progress');
      assert.equal(!read.claimed && read.record.response, null);
    }),

    check(
      'releases a held key, so the next claim is a new one; a second release, or a late renewal or completion of the old lease, does nothing',
      async (s) => {
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        assert.equal(await s.store.release(lease), true);
        assert.equal(await s.store.release(lease), false);
        // A late renewal of the released lease brings nothing back.
        assert.equal(await s.store.renew(lease, s.now + 5 * MINUTE), false);
        const again = await s.claim(id, 'fp-b');
        assert.equal(again.claimed, true);
        assert.equal(again.claimed && again.takeover, false);
        // Nor does any late write of it touch the new claim.
        assert.equal(await s.store.renew(lease, s.now + 5 * MINUTE), false);
        assert.equal(await s.store.complete(lease, sampleResponse(), s.now + 10 * MINUTE), false);
        assert.equal(await s.store.release(lease), false);
        const read = await s.claim(id, 'fp-b');
        assert.equal(!read.claimed && read.record.state, 'in_progress');
        assert.equal(!read.claimed && read.record.expiresAt, s.now + MINUTE);
      },
    ),

    check(
      'tells where a lease stands (leaseState, if the store has it): held, completed, gone, taken over',
      async (s) => {
        const leaseState = s.store.leaseState?.bind(s.store);
        if (!leaseState) return;
        const held = await s.leaseOf(s.id(), 'fp-a');
        assert.equal(await leaseState(held), 'held');
        assert.equal(await leaseState({ ...held, token: randomUUID() }), 'taken');
        assert.equal(await s.store.complete(held, sampleResponse(), s.now + 10 * MINUTE), true);
        assert.equal(await leaseState(held), 'completed');
        const released = await s.leaseOf(s.id(), 'fp-a');
        assert.equal(await s.store.release(released), true);
        assert.equal(await leaseState(released), 'absent');
        const abandoned = await s.leaseOf(s.id(), 'fp-a');
        const takeover = await s.claim(abandoned.id, 'fp-a', s.now + MINUTE + 1);
        assert.equal(takeover.claimed, true);
        assert.equal(await leaseState(abandoned), 'taken');
      },
    ),

    check(
      'purges expired records in batches of at most `limit`, and never a live one',
      async (s) => {
        const realNow = Date.now();
        // A store that expires records by itself may already have dropped these: only the live one
        // is checked there.
        const expired = options.expiresByItself ? [] : [s.id(), s.id(), s.id()];
        for (const id of expired) {
          const lease = await s.leaseOf(id, 'fp-a', realNow - 10 * MINUTE, realNow - 5 * MINUTE);
          assert.equal(await s.store.complete(lease, sampleResponse(), realNow - MINUTE), true);
        }
        const abandoned = s.id();
        if (!options.expiresByItself)
          await s.leaseOf(abandoned, 'fp-a', realNow - 10 * MINUTE, realNow - 5 * MINUTE);
        const live = s.id();
        const liveLease = await s.leaseOf(live, 'fp-a', realNow, realNow + 10 * MINUTE);
        for (let batches = 0; ; batches++) {
          assert.ok(batches < 10_000, 'the purge never finished');
          const deleted = await s.store.purgeExpired(Date.now(), 2);
          assert.ok(deleted >= 0 && deleted <= 2, `a purge with limit 2 deleted ${deleted}`);
          if (deleted === 0) break;
        }
        if (!options.expiresByItself) {
          for (const id of [...expired, abandoned]) {
            // Gone: a claim with another payload is a new claim (an abandoned record would refuse it).
            const claim = await s.claim(id, 'fp-b', Date.now());
            assert.equal(
              claim.claimed && claim.takeover,
              false,
              'an expired record survived the purge',
            );
          }
        }
        const read = await s.claim(live, 'fp-a', Date.now());
        assert.equal(
          !read.claimed && read.record.state,
          'in_progress',
          'the purge deleted a live record',
        );
        assert.equal(
          await s.store.complete(liveLease, sampleResponse(), Date.now() + MINUTE),
          true,
        );
      },
    ),

    check(
      'keeps ids apart that differ only in scope, endpoint, case or Unicode normalisation',
      async (s) => {
        const base = s.id();
        const ids: RecordId[] = [
          base,
          { ...base, scope: 'tenant-b' },
          { ...base, endpoint: `${base.endpoint}/x` },
          { ...base, key: base.key.toUpperCase() },
          { ...base, key: `${base.key}-\u00e9` },
          { ...base, key: `${base.key}-e\u0301` },
        ];
        for (const id of ids)
          assert.equal(
            (await s.claim(id, 'fp-a')).claimed,
            true,
            `${JSON.stringify(id)} was not new`,
          );
      },
    ),

    check(
      'keeps ids apart that differ only by leading or trailing spaces, case, Unicode normalisation or where a separator falls',
      async (s) => {
        // A collation that pads with spaces (MySQL's utf8mb4_bin) or folds case, or a store that
        // joins the parts with a separator, reads one id's record for another: another caller's.
        const base: RecordId = { ...s.id(), scope: 'tenant-a' };
        const ids: RecordId[] = [base, { ...base, scope: '' }, { ...base, scope: ' ' }];
        for (const part of ['scope', 'endpoint', 'key'] as const) {
          const value = base[part];
          const otherCase =
            value.toUpperCase() === value ? value.toLowerCase() : value.toUpperCase();
          for (const variant of [
            `${value} `,
            `${value}  `,
            ` ${value}`,
            `${value}\t`,
            `${value}\u00a0`,
            otherCase,
            `${value}\u00e9`, // é, composed (NFC)
            `${value}e\u0301`, // é, decomposed (NFD)
          ])
            ids.push({ ...base, [part]: variant });
        }
        for (const separator of ['', ' ', ':', '|', '/', ',', '","', '"', '\\', '\n']) {
          ids.push(
            { ...base, scope: `${base.scope}${separator}x` },
            { ...base, endpoint: `x${separator}${base.endpoint}` },
            { ...base, endpoint: `${base.endpoint}${separator}y` },
            { ...base, key: `y${separator}${base.key}` },
          );
        }
        const names = ids.map((id) => JSON.stringify(id));
        assert.equal(new Set(names).size, ids.length, 'the check itself repeats an id');
        const leases: Lease[] = [];
        for (const [i, id] of ids.entries()) {
          const claim = await s.claim(id, `fp-${i}`);
          assert.equal(
            claim.claimed && !claim.takeover,
            true,
            `${names[i]} was not new: it found the record of another id`,
          );
          if (claim.claimed) leases.push(claim.lease);
        }
        for (const [i, lease] of leases.entries()) {
          const response = { ...sampleResponse(), body: JSON.stringify({ id: names[i] }) };
          assert.equal(await s.store.complete(lease, response, s.now + MINUTE), true);
        }
        for (const [i, id] of ids.entries()) {
          const read = await s.claim(id, `fp-${i}`);
          assert.equal(read.claimed, false);
          if (read.claimed) continue;
          assert.equal(read.record.fingerprint, `fp-${i}`, `${names[i]} read another id's record`);
          assert.equal(read.record.response?.body, JSON.stringify({ id: names[i] }));
        }
      },
    ),

    check('handles keys, scopes and endpoints of 255 characters, in any script', async (s) => {
      const unicode = 'ключ-鍵-مفتاح-🔑-';
      const id: RecordId = {
        scope: 'тенант-'.repeat(40).slice(0, 255),
        endpoint: `POST /${unicode}`.padEnd(255, 'é'),
        key: `${unicode}${randomUUID()}`.padEnd(255, 'x'),
      };
      const lease = await s.leaseOf(id, 'fp-a');
      const response = { ...sampleResponse(), body: JSON.stringify({ text: unicode, ok: '✓' }) };
      assert.equal(await s.store.complete(lease, response, s.now + MINUTE), true);
      const read = await s.claim(id, 'fp-a');
      assert.equal(read.claimed, false);
      if (read.claimed) return;
      assert.deepEqual(read.record.response, response);
      assert.equal((await s.claim({ ...id, key: id.key.slice(0, 254) }, 'fp-a')).claimed, true);
    }),

    check('stores bodies of 1 MiB, binary ones and none at all', async (s) => {
      const bodies: StoredResponse[] = [
        { ...sampleResponse(), body: JSON.stringify({ blob: 'x'.repeat(1024 * 1024 - 20) }) },
        {
          ...sampleResponse(),
          body: Buffer.from(Array.from({ length: 4096 }, (_, i) => i % 256)).toString('base64'),
          bodyEncoding: 'base64',
        },
        { ...sampleResponse(), status: 204, body: null },
      ];
      for (const response of bodies) {
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        assert.equal(await s.store.complete(lease, response, s.now + MINUTE), true);
        const read = await s.claim(id, 'fp-a');
        assert.equal(read.claimed, false);
        if (!read.claimed) assert.deepEqual(read.record.response, response);
      }
    }),

    check(
      'deletes a record only as the operator saw it (deleteRecord, when supported)',
      async (s) => {
        if (!s.store.deleteRecord) return;
        const held = s.id();
        const neighbour = s.id();
        const lease = await s.leaseOf(held, 'fp-a');
        await s.leaseOf(neighbour, 'fp-a');
        assert.equal(
          await s.store.deleteRecord(held, { state: 'in_progress', token: randomUUID() }),
          false,
          'a record held under another token must not be deleted',
        );
        assert.equal(
          await s.store.deleteRecord(held, { state: 'completed', token: lease.token }),
          false,
        );
        assert.equal((await s.claim(held, 'fp-a')).claimed, false, 'the record must still be held');
        assert.equal(
          await s.store.deleteRecord(held, { state: 'in_progress', token: lease.token }),
          true,
        );
        assert.equal(
          await s.store.complete(lease, sampleResponse(), s.now + MINUTE),
          false,
          'the completion of a deleted record must be refused',
        );
        assert.equal((await s.claim(held, 'fp-b')).claimed, true, 'a deleted key is claimed anew');
        assert.equal(
          (await s.claim(neighbour, 'fp-a')).claimed,
          false,
          'another record was deleted with it',
        );

        const completed = s.id();
        const done = await s.leaseOf(completed, 'fp-a');
        assert.equal(await s.store.complete(done, sampleResponse(), s.now + MINUTE), true);
        assert.equal(
          await s.store.deleteRecord(completed, { state: 'in_progress', token: done.token }),
          false,
          'a completed record must not be deleted as one in progress',
        );
        assert.equal(
          await s.store.deleteRecord(completed, { state: 'completed', token: done.token }),
          true,
        );
        assert.equal((await s.claim(completed, 'fp-a')).claimed, true);
        assert.equal(
          await s.store.deleteRecord(s.id(), { state: 'completed', token: done.token }),
          false,
        );
      },
    ),

    check(
      'tells each listener once it listens, later and never synchronously, then of every deletion (onInvalidated)',
      async (s) => {
        if (!s.store.deleteRecord || !s.store.onInvalidated) return;
        const first = heard();
        const stopFirst = s.store.onInvalidated(first.listener);
        if (!stopFirst) return;
        try {
          assert.deepEqual(first.events, [], 'told during the call, before the caller was set up');
          if (options.listens === false) return;
          await first.until(isListening, 'an `all` once it listens');
          // Added while the store already listens: it heard nothing before, so it is told `all` too.
          const second = heard();
          const stopSecond = s.store.onInvalidated(second.listener)!;
          try {
            assert.deepEqual(
              second.events,
              [],
              'told during the call, before the caller was set up',
            );
            await second.until(isListening, 'an `all` for a listener added while listening');
            const id = s.id();
            const other = s.id();
            const lease = await s.leaseOf(id, 'fp-a');
            // What each was told before the deletion (its `all` among it) does not count.
            const marks = [first.events.length, second.events.length];
            assert.equal(
              await s.store.deleteRecord(id, { state: 'in_progress', token: lease.token }),
              true,
            );
            for (const [i, listener] of [first, second].entries()) {
              const told = await listener.until(
                (invalidation) => invalidation.all || invalidation.matches(id),
                'the deleted record',
                marks[i],
              );
              if (!told.all) assert.equal(told.matches(other), false, 'another record matched');
            }
          } finally {
            stopSecond();
          }
        } finally {
          stopFirst();
        }
      },
    ),

    check('tells a stopped listener nothing (onInvalidated)', async (s) => {
      if (!s.store.deleteRecord || !s.store.onInvalidated || options.listens === false) return;
      const stopped = heard();
      const stop = s.store.onInvalidated(stopped.listener);
      if (!stop) return;
      stop();
      const live = heard();
      const stopLive = s.store.onInvalidated(live.listener)!;
      try {
        await live.until(isListening, 'an `all` once it listens');
        const id = s.id();
        const lease = await s.leaseOf(id, 'fp-a');
        const mark = live.events.length;
        assert.equal(
          await s.store.deleteRecord(id, { state: 'in_progress', token: lease.token }),
          true,
        );
        await live.until(
          (invalidation) => invalidation.all || invalidation.matches(id),
          'the deletion',
          mark,
        );
        // Both would be told in the same turn: the live one was, so the stopped one would have been.
        assert.deepEqual(stopped.events, [], 'a stopped listener was told');
      } finally {
        stopLive();
      }
    }),
  ];
}

/** setTimeout's longest delay (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

const isListening = (invalidation: RecordInvalidation) =>
  invalidation.all && invalidation.listening !== false;

/** What one `onInvalidated` listener was told, and a wait for what it expects. */
class Heard {
  readonly events: RecordInvalidation[] = [];
  private waiter?: () => void;

  constructor(private readonly timeoutMs: number) {}

  readonly listener = (invalidation: RecordInvalidation): void => {
    this.events.push(invalidation);
    this.waiter?.();
  };

  /**
   * The first invalidation that `matches`, among those told from the `from`-th on (told already or
   * from now on); fails after the timeout.
   */
  async until(
    matches: (invalidation: RecordInvalidation) => boolean,
    what: string,
    from = 0,
  ): Promise<RecordInvalidation> {
    const deadline = Date.now() + this.timeoutMs;
    let seen = from;
    for (;;) {
      for (; seen < this.events.length; seen++) {
        if (matches(this.events[seen])) return this.events[seen];
      }
      const remaining = deadline - Date.now();
      assert.ok(remaining > 0, `not told ${what} within ${this.timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        // Unref'd: a check that failed its runner's own timeout keeps no process alive.
        const timer = setTimeout(resolve, Math.min(remaining, MAX_TIMER_MS));
        timer.unref();
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }
}

/** One check's view of the store: fresh ids, and claims at a fixed `now`. */
class Subject {
  readonly now = Date.now();
  private readonly endpoint = `CONTRACT /${randomUUID()}`;
  private ids = 0;

  constructor(readonly store: IdempotencyStore) {}

  id(): RecordId {
    return { scope: '', endpoint: this.endpoint, key: `key-${++this.ids}-${randomUUID()}` };
  }

  claim(
    id: RecordId,
    fingerprint: string,
    now = this.now,
    lockedUntil = now + MINUTE,
  ): Promise<ClaimResult> {
    return this.store.claim({ id, fingerprint, token: randomUUID(), now, lockedUntil });
  }

  /** Claims a new id and returns the lease; the claim locks it until `lockedUntil`. */
  async leaseOf(
    id: RecordId,
    fingerprint: string,
    now = this.now,
    lockedUntil = this.now + MINUTE,
  ): Promise<Lease> {
    const result = await this.claim(id, fingerprint, now, lockedUntil);
    assert.equal(result.claimed, true, `${JSON.stringify(id)} could not be claimed`);
    if (!result.claimed) throw new Error('unreachable');
    return result.lease;
  }
}

function sampleResponse(): StoredResponse {
  return {
    status: 201,
    headers: {
      'content-type': 'application/json; charset=utf-8',
      'set-cookie': ['a=1', 'b=2'],
      location: '/payments/1',
    },
    body: JSON.stringify({ id: randomUUID(), amount: 4200, note: null }),
    bodyEncoding: 'json',
    isError: false,
  };
}
