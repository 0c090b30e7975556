import { Body, Controller, Module, Post, type INestApplication, type Type } from '@nestjs/common';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { DataSource } from 'typeorm';
import {
  Idempotent,
  IdempotencyContext,
  IdempotencyModule,
  IdempotencyRecord,
} from '../lib/index.js';
import { recordsOf } from './fixtures/fixture-app.js';
import {
  eachDatabase,
  eachTarget,
  type HttpPlatform,
  type TestDatabase,
} from './support/databases.js';
import { expectProblem, newKey } from './support/http.js';

/**
 * Route options as a controller hierarchy gives them: generic CRUD bases whose handlers every
 * subclass shares (one function, several controllers), and options set on the module, the class
 * and the method, merged field by field (method over class over module).
 */

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;

/** Handler runs, per route and key. */
const runs = new Map<string, number>();
const ran = (route: string, key: string | undefined) =>
  void runs.set(`${route} ${key}`, (runs.get(`${route} ${key}`) ?? 0) + 1);
const runsOf = (route: string, key: string | undefined) => runs.get(`${route} ${key}`) ?? 0;

/** A generic base: every subclass serves these handlers, the same function objects. */
abstract class CrudController {
  protected abstract readonly name: string;

  /** Protected by the subclass's class-level @Idempotent(), if any. */
  @Post()
  create(@Body() body: { key?: string }) {
    ran(`${this.name}.create`, body.key);
    return { id: randomUUID(), controller: this.name };
  }

  /** Its own @Idempotent(), with nothing set: the class's and module's options apply. */
  @Post('bare')
  @Idempotent()
  bare(@Body() body: { key?: string }) {
    ran(`${this.name}.bare`, body.key);
    return { id: randomUUID() };
  }

  /** Sets one field: the rest comes from the class, then the module. */
  @Post('optional')
  @Idempotent({ required: false })
  optional(@Body() body: { key?: string }) {
    ran(`${this.name}.optional`, body.key);
    return { id: randomUUID() };
  }

  /** A field the class sets too: the method's wins. */
  @Post('short')
  @Idempotent({ ttl: '5m' })
  short(@Body() body: { key?: string }) {
    ran(`${this.name}.short`, body.key);
    return { id: randomUUID() };
  }
}

/** Keys optional, kept an hour, one scope for every caller. */
@Controller('lenient')
@Idempotent({ required: false, ttl: '1h' })
class LenientController extends CrudController {
  protected readonly name = 'lenient';
}

/** Keys required (the module's default), kept two days, one scope per tenant. */
@Controller('tenants')
@Idempotent({ ttl: '2d', scope: (request) => String(request.headers['x-tenant'] ?? '') })
class TenantController extends CrudController {
  protected readonly name = 'tenants';
}

/** No class-level options: the methods' own @Idempotent() over the module's. */
@Controller('plain')
class PlainController extends CrudController {
  protected readonly name = 'plain';
}

/** A base that keys every route per tenant, for two days; its own handler. */
@Idempotent({ ttl: '2d', scope: (request) => String(request.headers['x-tenant'] ?? '') })
abstract class TenantScopedController {
  @Post()
  create(@Body() body: { key?: string }) {
    ran('short-tenants.create', body.key);
    return { id: randomUUID() };
  }
}

/** Its subclass's own @Idempotent() sets only a shorter ttl: the base's scope still applies. */
@Controller('short-tenants')
@Idempotent({ ttl: '1h' })
class ShortTenantController extends TenantScopedController {}

/** Transactional from its class; the method sets another field only. */
@Controller('ledger')
@Idempotent({ transactional: true })
class LedgerController {
  @Post()
  @Idempotent({ required: false })
  book() {
    return { transactional: IdempotencyContext.current()?.entityManager !== undefined };
  }
}

interface App {
  readonly app: INestApplication;
  readonly http: any;
  readonly dataSource: DataSource;
}

/** The module keeps keys three hours: distinct from every class and method ttl above. */
async function boot(
  database: TestDatabase,
  platform: HttpPlatform,
  controllers: Type[] = [
    PlainController,
    LenientController,
    TenantController,
    ShortTenantController,
  ],
): Promise<App> {
  const dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });
  await dataSource.initialize();
  @Module({
    imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false, ttl: '3h' })],
    controllers,
  })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] })
    .compile()
    .catch(async (error: unknown) => {
      await dataSource.destroy();
      throw error;
    });
  const app =
    platform === 'fastify'
      ? moduleRef.createNestApplication(new FastifyAdapter(), { logger: false })
      : moduleRef.createNestApplication({ logger: false });
  await app.init().catch(async (error: unknown) => {
    await app.close().catch(() => undefined);
    await dataSource.destroy();
    throw error;
  });
  if (platform === 'fastify') await app.getHttpAdapter().getInstance().ready();
  return { app, http: app.getHttpServer(), dataSource };
}

describe.each(eachTarget)('route options on %s', (_name, { database, platform }) => {
  /** One app per block below: which controller reaches a shared handler first is each test's. */
  let app: App;
  const bootPerBlock = () => {
    beforeAll(async () => (app = await boot(database, platform)));
    afterAll(async () => {
      await app.app.close();
      await app.dataSource.destroy();
    });
  };

  /** POSTs with `key` (none when undefined) and an optional tenant; the body names the key. */
  const send = (path: string, key: string | undefined, tenant?: string) => {
    const call = request(app.http).post(path).send({ key });
    if (key !== undefined) call.set('Idempotency-Key', key);
    if (tenant !== undefined) call.set('X-Tenant', tenant);
    return call;
  };

  /** How long the record of `key` on `endpoint` is kept, from its creation: the route's ttl. */
  const keptFor = async (key: string, endpoint: string) => {
    const [record] = (await recordsOf(app.dataSource, key)).filter((r) => r.endpoint === endpoint);
    expect(record).toBeDefined();
    return record.expiresAt - record.createdAt;
  };
  const expectTtl = (kept: number, ttl: number) => {
    expect(kept).toBeGreaterThanOrEqual(ttl);
    expect(kept).toBeLessThan(ttl + 10_000);
  };

  describe('a handler inherited by several controllers', () => {
    bootPerBlock();

    it("requires the key on one controller although another one's options make it optional", async () => {
      // The lenient controller answers first, so its options are the first ones resolved.
      await send('/lenient', undefined).expect(201);
      expect(runsOf('lenient.create', undefined)).toBeGreaterThan(0);
      const before = runsOf('tenants.create', undefined);
      expectProblem(await send('/tenants', undefined, 't1'), 400, 'key-missing');
      expect(runsOf('tenants.create', undefined)).toBe(before);
    });

    it("keeps each controller's own ttl", async () => {
      const lenient = newKey();
      const tenants = newKey();
      await send('/lenient', lenient).expect(201);
      await send('/tenants', tenants, 't1').expect(201);
      expectTtl(await keptFor(lenient, 'POST /lenient'), HOUR);
      expectTtl(await keptFor(tenants, 'POST /tenants'), 48 * HOUR);
    });

    it("keeps each controller's own scope: one key, two tenants, two operations", async () => {
      const warmUp = newKey();
      await send('/lenient', warmUp).expect(201);
      const key = newKey();
      const first = await send('/tenants', key, 't1').expect(201);
      const other = await send('/tenants', key, 't2').expect(201);
      expect(other.headers['idempotent-replayed']).toBeUndefined();
      expect(other.body.id).not.toBe(first.body.id);
      const replay = await send('/tenants', key, 't1').expect(201);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body).toEqual(first.body);
      expect(runsOf('tenants.create', key)).toBe(2);
      expect((await recordsOf(app.dataSource, key)).map((r) => r.scope).sort()).toEqual([
        't1',
        't2',
      ]);
    });

    it('runs once on a controller that adds its own @Idempotent(), after one that does not', async () => {
      // PlainController lists the interceptor once on `bare`; TenantController twice (class and method).
      await send('/plain/bare', newKey()).expect(201);
      const key = newKey();
      const first = await send('/tenants/bare', key, 't1');
      expect(first.status).toBe(201);
      const retry = await send('/tenants/bare', key, 't1').expect(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(runsOf('tenants.bare', key)).toBe(1);
      expect(await recordsOf(app.dataSource, key)).toHaveLength(1);
    });
  });

  describe('options merged field by field: method over class over module', () => {
    bootPerBlock();

    it("takes the class's options where the method's @Idempotent() sets none", async () => {
      // Method: nothing; class: required false, ttl 1h.
      await send('/lenient/bare', undefined).expect(201);
      const key = newKey();
      await send('/lenient/bare', key).expect(201);
      expectTtl(await keptFor(key, 'POST /lenient/bare'), HOUR);
    });

    it("keeps the class's ttl and scope when the method sets only required", async () => {
      // Method: required false; class: ttl 2d, scope per tenant.
      await send('/tenants/optional', undefined, 't1').expect(201);
      const key = newKey();
      await send('/tenants/optional', key, 't1').expect(201);
      await send('/tenants/optional', key, 't2').expect(201);
      expect(runsOf('tenants.optional', key)).toBe(2);
      expectTtl(await keptFor(key, 'POST /tenants/optional'), 48 * HOUR);
    });

    it("lets the method's ttl beat the class's, and keeps the class's scope and the module's required", async () => {
      // Method: ttl 5m; class: ttl 2d, scope; module: required (the default).
      expectProblem(await send('/tenants/short', undefined, 't1'), 400, 'key-missing');
      const key = newKey();
      await send('/tenants/short', key, 't1').expect(201);
      await send('/tenants/short', key, 't2').expect(201);
      expect(runsOf('tenants.short', key)).toBe(2);
      expectTtl(await keptFor(key, 'POST /tenants/short'), 5 * MINUTE);
    });

    it("merges a subclass's @Idempotent() over its base class's: the base's scope, the subclass's ttl", async () => {
      const key = newKey();
      const first = await send('/short-tenants', key, 't1').expect(201);
      const other = await send('/short-tenants', key, 't2').expect(201);
      expect(other.headers['idempotent-replayed']).toBeUndefined();
      expect(other.body.id).not.toBe(first.body.id);
      expect(runsOf('short-tenants.create', key)).toBe(2);
      expect((await recordsOf(app.dataSource, key)).map((r) => r.scope).sort()).toEqual([
        't1',
        't2',
      ]);
      const kept = (await recordsOf(app.dataSource, key)).map((r) => r.expiresAt - r.createdAt);
      for (const ttl of kept) expectTtl(ttl, HOUR);
    });

    it("falls back on the module's ttl where neither the method nor the class sets one", async () => {
      const key = newKey();
      await send('/plain/optional', key).expect(201);
      expectTtl(await keptFor(key, 'POST /plain/optional'), 3 * HOUR);
      await send('/plain/optional', undefined).expect(201);
    });
  });
});

describe('a transactional controller whose method sets other options', () => {
  const database = (name: string) => eachDatabase.find(([candidate]) => candidate === name)![1];

  it('runs the method in a transaction on PGlite', async () => {
    const app = await boot(database('pglite'), 'express', [LedgerController]);
    try {
      const response = await request(app.http).post('/ledger').set('Idempotency-Key', newKey());
      expect(response.status).toBe(201);
      expect(response.body).toEqual({ transactional: true });
    } finally {
      await app.app.close();
      await app.dataSource.destroy();
    }
  });

  it('is refused at startup on SQLite, as the interceptor would run it in a transaction', async () => {
    await expect(boot(database('sqlite'), 'express', [LedgerController])).rejects.toThrow(
      /transactional routes \(LedgerController\.book\) cannot run on this store/,
    );
  });
});
