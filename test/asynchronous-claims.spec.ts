import { Controller, Injectable, Post } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  Idempotent,
  IdempotencyContext,
  IdempotencyRecord,
  TypeOrmIdempotencyStore,
} from '../lib/index.js';
import { ensureIdempotencyTable } from '../lib/storage/typeorm/idempotency-data-source.js';
import { createReliabilityApp, type ReliabilityApp } from './fixtures/reliability-app.js';
import type { TestDatabase } from './support/databases.js';
import type { Response } from 'supertest';
import { newKey, post } from './support/http.js';
import { havePostgresTools, PgCluster } from './support/pg-cluster.js';
import { waitFor } from './support/reliability.js';

/**
 * Claims that commit without waiting for their flush (`asynchronousClaim`, the default of
 * transactional routes), shown on a cluster of the test's own whose `synchronous_standby_names`
 * names a standby that never connects: there every durable commit waits (for ever) for that
 * standby, while a commit with `synchronous_commit = off` returns at once. Once the setting is
 * reset, the waiting commits return.
 */
const describeWithTools = havePostgresTools ? describe : describe.skip;
if (!havePostgresTools) console.warn('[asynchronous-claims] SKIPPED: no PostgreSQL tools');

/** How many times each route's handler ran, by key. */
@Injectable()
class Runs {
  readonly byRoute = new Map<string, string[]>();
  record(route: string, key: string) {
    this.byRoute.set(route, [...(this.byRoute.get(route) ?? []), key]);
  }
  of(route: string, key: string): number {
    return (this.byRoute.get(route) ?? []).filter((k) => k === key).length;
  }
}

@Controller('claims')
class ClaimsController {
  constructor(
    private readonly runs: Runs,
    private readonly idempotency: IdempotencyContext,
  ) {}

  @Post('durable')
  @Idempotent()
  durable() {
    this.runs.record('durable', this.idempotency.operation!.key);
    return { ran: 'durable' };
  }

  @Post('asynchronous')
  @Idempotent({ asynchronousClaim: true })
  asynchronous() {
    this.runs.record('asynchronous', this.idempotency.operation!.key);
    return { ran: 'asynchronous' };
  }

  @Post('transactional')
  @Idempotent({ transactional: true })
  async transactional() {
    this.runs.record('transactional', this.idempotency.operation!.key);
    await this.idempotency.entityManager.query('INSERT INTO claim_effects (key) VALUES ($1)', [
      this.idempotency.operation!.key,
    ]);
    return { ran: 'transactional' };
  }

  @Post('transactional-durable')
  @Idempotent({ transactional: true, asynchronousClaim: false })
  async transactionalDurable() {
    this.runs.record('transactional-durable', this.idempotency.operation!.key);
    await this.idempotency.entityManager.query('INSERT INTO claim_effects (key) VALUES ($1)', [
      this.idempotency.operation!.key,
    ]);
    return { ran: 'transactional-durable' };
  }
}

describeWithTools('claims that commit without waiting for their flush', () => {
  let cluster: PgCluster;
  let admin: DataSource;
  let fixture: ReliabilityApp;
  let runs: Runs;

  /** From now on every durable commit waits for a standby that never comes. */
  const holdDurableCommits = async () => {
    await admin.query(`ALTER SYSTEM SET synchronous_standby_names = 'absent'`);
    await admin.query('SELECT pg_reload_conf()');
  };
  /** Durable commits return again (the ones waiting too). */
  const releaseDurableCommits = async () => {
    await admin.query('ALTER SYSTEM RESET synchronous_standby_names');
    await admin.query('SELECT pg_reload_conf()');
  };
  /** Resolves to the value, or to 'pending' if it has not settled by then. */
  const stateAfter = <T>(promise: Promise<T>, ms: number): Promise<T | 'pending'> =>
    Promise.race([promise, new Promise<'pending'>((r) => setTimeout(() => r('pending'), ms))]);

  beforeAll(async () => {
    cluster = await PgCluster.primary();
    // The admin connection commits locally only, so it can change the setting back.
    admin = await new DataSource({
      type: 'postgres',
      url: cluster.url,
      extra: { options: '-c synchronous_commit=local' },
    }).initialize();
    await admin.query('CREATE TABLE claim_effects (key text NOT NULL)');
    const database: TestDatabase = {
      name: 'own cluster',
      shared: false,
      ownTablePerConnection: true,
      transactions: true,
      options: () => ({ type: 'postgres', url: cluster.url }),
    };
    // Commits held for the test's length must not time out as an unavailable store.
    fixture = await createReliabilityApp(
      database,
      { storeTimeout: '2m' },
      { controllers: [ClaimsController], providers: [Runs] },
    );
    runs = fixture.app.get(Runs);
  }, 60_000);

  afterAll(async () => {
    await releaseDurableCommits().catch(() => undefined);
    await fixture?.close();
    await admin?.destroy();
    await cluster?.remove();
  });

  it('runs the handler of an asynchronous claim while durable commits wait; every route runs once and replays once they return', async () => {
    const key = newKey();
    const routes = ['durable', 'transactional-durable', 'asynchronous', 'transactional'];
    await holdDurableCommits();
    const first = new Map<string, Promise<Response>>();
    try {
      for (const route of routes) {
        first.set(
          route,
          post(fixture.baseUrl, `/claims/${route}`, key).then((response) => response),
        );
      }
      // The claims that do not wait for the standby went through: their handlers ran (the
      // responses themselves wait, on the completion and on the transaction's commit).
      await waitFor('the asynchronous claims’ handlers to run', () =>
        runs.of('asynchronous', key) === 1 && runs.of('transactional', key) === 1
          ? true
          : undefined,
      );
      // The durable claims are still waiting for the standby: their handlers have not run, and no
      // request has been answered.
      expect(runs.of('durable', key)).toBe(0);
      expect(runs.of('transactional-durable', key)).toBe(0);
      for (const route of routes) expect(await stateAfter(first.get(route)!, 200)).toBe('pending');
    } finally {
      await releaseDurableCommits();
    }

    for (const route of routes) {
      const response = await first.get(route)!;
      expect(response.status).toBe(201);
      expect(response.body).toEqual({ ran: route });
      const retry = await post(fixture.baseUrl, `/claims/${route}`, key);
      expect(retry.status).toBe(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(runs.of(route, key)).toBe(1);
    }
    const effects = await admin.query('SELECT key FROM claim_effects WHERE key = $1', [key]);
    expect(effects).toHaveLength(2);
  }, 60_000);

  it('the store: an asynchronous claim returns while a durable one waits for the standby', async () => {
    const dataSource = await new DataSource({
      type: 'postgres',
      url: cluster.url,
      entities: [IdempotencyRecord],
    }).initialize();
    await ensureIdempotencyTable(dataSource);
    const store = new TypeOrmIdempotencyStore(dataSource);
    const claim = (key: string, asynchronousCommit: boolean) =>
      store.claim({
        id: { scope: 'store', endpoint: 'POST /store', key },
        fingerprint: 'f'.repeat(64),
        token: randomUUID(),
        now: Date.now(),
        lockedUntil: Date.now() + 60_000,
        asynchronousCommit,
      });
    try {
      await holdDurableCommits();
      const durable = claim('durable', false);
      const asynchronous = await claim('asynchronous', true);
      expect(asynchronous).toMatchObject({ claimed: true, takeover: false });
      expect(await stateAfter(durable, 200)).toBe('pending');
      await releaseDurableCommits();
      expect(await durable).toMatchObject({ claimed: true, takeover: false });
    } finally {
      await releaseDurableCommits();
      await store.close();
      await dataSource.destroy();
    }
  }, 30_000);

  it('stores keys and scopes with quotes, backslashes, braces and commas exactly', async () => {
    const dataSource = await new DataSource({
      type: 'postgres',
      url: cluster.url,
      entities: [IdempotencyRecord],
    }).initialize();
    const store = new TypeOrmIdempotencyStore(dataSource);
    const awkward = [
      `it's`,
      'say "hi"',
      'back\\slash',
      '\\"',
      '{a,b}',
      'NULL',
      ' spaced ',
      '$1',
      'ü\u00e9\u{1F600}',
    ];
    try {
      const ids = awkward.map((text) => ({ scope: text, endpoint: `POST /${text}`, key: text }));
      const claims = await Promise.all(
        ids.map((id) =>
          store.claim({
            id,
            fingerprint: 'f'.repeat(64),
            token: randomUUID(),
            now: Date.now(),
            lockedUntil: Date.now() + 60_000,
            asynchronousCommit: true,
          }),
        ),
      );
      expect(claims.every((claim) => claim.claimed)).toBe(true);
      const rows: { scope: string; endpoint: string; idempotency_key: string }[] =
        await dataSource.query(
          'SELECT scope, endpoint, idempotency_key FROM idempotency_records WHERE scope = ANY($1)',
          [awkward],
        );
      expect(rows.map((row) => [row.scope, row.endpoint, row.idempotency_key]).sort()).toEqual(
        ids.map((id) => [id.scope, id.endpoint, id.key]).sort(),
      );
    } finally {
      await store.close();
      await dataSource.destroy();
    }
  });
});
