import { Controller, Headers, Post } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { Idempotent, IdempotencyMetrics, IdempotencyRecord } from '../lib/index.js';
import { recordsOf, stealClaim, waitUntilPast } from './fixtures/fixture-app.js';
import { CallLog, HandlerGate } from './fixtures/handler-probes.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachDatabase, type TestDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';
import { startProxyFor, throughProxy } from './support/proxied-database.js';
import { waitFor } from './support/reliability.js';
import type { TcpProxy } from './support/tcp-proxy.js';

/**
 * The two lockTimeouts of the routes here: two beats of the lease keeper (200 ms and 600 ms). With
 * one renewal stalled, the next beat's renewal has one beat to answer before the lock renewed two
 * beats earlier runs out (and is reported lapsed): 100 ms beats were too short for the round trip
 * on a loaded CI machine (CI of 8 Dec: every fast lease reported lapsed, all renewed in the end).
 */
const FAST_LOCK_MS = 600;
const SLOW_LOCK_MS = 1800;

/** Two held routes whose leases are renewed at different intervals. */
@Controller('core2')
class TwoBeatsController {
  constructor(
    private readonly calls: CallLog,
    private readonly gate: HandlerGate,
  ) {}

  @Post('fast')
  @Idempotent({ lockTimeout: FAST_LOCK_MS })
  async fast(@Headers('idempotency-key') key: string) {
    this.calls.record('fast', key);
    await this.gate.pass(key);
    return { id: randomUUID() };
  }

  @Post('slow')
  @Idempotent({ lockTimeout: SLOW_LOCK_MS })
  async slow(@Headers('idempotency-key') key: string) {
    this.calls.record('slow', key);
    await this.gate.pass(key);
    return { id: randomUUID() };
  }
}

/** A renewal as the proxy sees it (PostgreSQL's prepared statement, or its first SQL). */
const RENEWAL = /nestjs_idempotency_renew|GREATEST\((r\.)?expires_at/;

const postgres = eachDatabase.filter(([name]) => name === 'postgres');
const describeOnPostgres = postgres.length
  ? describe.each(postgres)
  : describe.skip.each([['no PostgreSQL (set DATABASE_URL)', undefined!]]);

describeOnPostgres(
  'the one-beat lease keeper under review on %s',
  (_name, database: TestDatabase) => {
    let proxy: TcpProxy;
    let fixture: ReliabilityApp;
    /** Reads the table without the proxy. */
    let direct: DataSource;
    const log = new CapturedLog();
    const lostLeases = () => fixture.app.get(IdempotencyMetrics).snapshot()['lease-lost'];
    /** Warnings and errors of the module since `from` (lines of the log). */
    const problemsSince = (from: number) =>
      log.lines.slice(from).filter((line) => line.level === 'warn' || line.level === 'error');

    beforeAll(async () => {
      proxy = await startProxyFor(database);
      fixture = await createReliabilityApp(
        throughProxy(database, proxy),
        { storeTimeout: '1s' },
        { controllers: [TwoBeatsController], logger: log },
      );
      direct = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
      await direct.initialize();
    });
    afterEach(() => proxy.releaseStalls());
    afterAll(async () => {
      await fixture?.close();
      await proxy?.close();
      await direct?.destroy();
    });

    /** Starts `count` held requests on `path`, one every `spreadMs`; resolves once all have claimed. */
    async function holdMany(path: string, count: number, spreadMs: number) {
      const started: { key: string; response: Promise<{ status: number; body: unknown }> }[] = [];
      for (let i = 0; i < count; i++) {
        const key = newKey();
        fixture.gate.hold(key);
        const response = post(fixture.baseUrl, path, key).then((r) => r);
        started.push({ key, response });
        await fixture.gate.arrived(key);
        await new Promise((resolve) => setTimeout(resolve, spreadMs));
      }
      return started;
    }

    it('many leases on two beats, claimed across a beat, one renewal stalled: every key stays claimed, each handler runs once, nothing lost or logged', async () => {
      const logFrom = log.lines.length;
      const lostBefore = lostLeases();
      // Claims spread over a whole interval of each beat: some land right before a beat.
      const fast = await holdMany('/core2/fast', 8, 30);
      const slow = await holdMany('/core2/slow', 6, 100);
      // One renewal never answers (its connection stalls); the others go on.
      const stalledBefore = proxy.counts.stalled;
      proxy.stall(RENEWAL, 1);
      await waitFor('a renewal to stall', () =>
        proxy.counts.stalled > stalledBefore ? true : undefined,
      );
      // Past twice the longer lockTimeout: without renewal every lock would have run out.
      await waitUntilPast(Date.now() + 2 * SLOW_LOCK_MS);
      const duplicates = await Promise.all(
        [
          ...fast.map((held) => ['/core2/fast', held.key]),
          ...slow.map((h) => ['/core2/slow', h.key]),
        ].map(([path, key]) => post(fixture.baseUrl, path, key).then((r) => r.status)),
      );
      expect(duplicates).toEqual(duplicates.map(() => 409));
      for (const { key } of [...fast, ...slow]) fixture.gate.open(key);
      const originals = await Promise.all([...fast, ...slow].map((held) => held.response));
      expect(originals.map((response) => response.status)).toEqual(originals.map(() => 201));
      for (const { key } of fast) expect(fixture.calls.count('fast', key)).toBe(1);
      for (const { key } of slow) expect(fixture.calls.count('slow', key)).toBe(1);
      proxy.releaseStalls();
      expect(lostLeases()).toBe(lostBefore);
      // The stalled renewal was given up on (a warning): nothing else went wrong.
      expect(
        problemsSince(logFrom).filter((line) => !/Could not renew the claim/.test(line.text)),
      ).toEqual([]);
    });

    it('a lease lost among many is reported once (one lease-lost, one warning), the others complete', async () => {
      const logFrom = log.lines.length;
      const lostBefore = lostLeases();
      const held = await holdMany('/core2/fast', 6, 10);
      const victim = held[2].key;
      const thief = await stealClaim(direct, victim);
      await waitFor('the renewal to find the lease gone', () =>
        lostLeases() > lostBefore ? true : undefined,
      );
      // Well past a lockTimeout: every other lease was renewed meanwhile.
      await waitUntilPast(Date.now() + 2 * FAST_LOCK_MS);
      const duplicates = await Promise.all(
        held
          .filter(({ key }) => key !== victim)
          .map(({ key }) => post(fixture.baseUrl, '/core2/fast', key).then((r) => r.status)),
      );
      expect(duplicates).toEqual(duplicates.map(() => 409));
      for (const { key } of held) fixture.gate.open(key);
      const originals = await Promise.all(held.map((h) => h.response));
      expect(originals.map((response) => response.status)).toEqual(originals.map(() => 201));
      // Its completion found the lease gone too: still once.
      expect(lostLeases()).toBe(lostBefore + 1);
      const [record] = await recordsOf(direct, victim);
      expect(record.leaseToken).toBe(thief);
      expect(problemsSince(logFrom).map((line) => line.level)).toEqual(['warn']);
      expect(problemsSince(logFrom)[0].text).toMatch(/was taken over/);
      for (const { key } of held.filter(({ key }) => key !== victim)) {
        const replay = await post(fixture.baseUrl, '/core2/fast', key);
        expect(replay.headers['idempotent-replayed']).toBe('true');
      }
    });
  },
);
