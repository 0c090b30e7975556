import { Controller, Module, Next, Post, Res, Sse, type INestApplication } from '@nestjs/common';
import { of } from 'rxjs';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { DataSource } from 'typeorm';
import {
  Idempotent,
  IdempotencyModule,
  IdempotencyRecord,
  IdempotencyStore,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { createFixtureApp, recordsOf, waitUntilPast } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';
import { newKey, post } from './support/http.js';

let runs = 0;

/** `@Idempotent()` on the class protects every route; a method's options beat the class's. */
@Controller('orders')
@Idempotent({ required: true })
class OrdersController {
  @Post()
  create() {
    runs++;
    return { id: randomUUID() };
  }

  @Post('drafts')
  @Idempotent({ required: false })
  draft() {
    runs++;
    return { id: randomUUID() };
  }
}

async function boot(imports: any[]): Promise<INestApplication> {
  @Module({ imports, controllers: [OrdersController] })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const app = moduleRef.createNestApplication({ logger: false });
  await app.init();
  return app;
}

/** Sends a key twice and expects one run and a replay; returns the key. */
async function expectProtects(app: INestApplication): Promise<string> {
  const key = randomUUID();
  const before = runs;
  const first = await request(app.getHttpServer()).post('/orders').set('Idempotency-Key', key);
  const retry = await request(app.getHttpServer()).post('/orders').set('Idempotency-Key', key);
  expect(first.status).toBe(201);
  expect(retry.headers['idempotent-replayed']).toBe('true');
  expect(retry.body).toEqual(first.body);
  expect(runs - before).toBe(1);
  return key;
}

describe('module setup', () => {
  it('works with no options at all, on an in-memory PGlite it creates itself', async () => {
    const app = await boot([IdempotencyModule.forRoot({})]);
    try {
      await expectProtects(app);
    } finally {
      await app.close();
    }
  });

  it('takes forRoot() without an argument as the defaults (plain JavaScript callers)', async () => {
    const app = await boot([IdempotencyModule.forRoot()]);
    try {
      await expectProtects(app);
    } finally {
      await app.close();
    }
  });

  it('applies class-level @Idempotent() once, and lets a method override it', async () => {
    const app = await boot([IdempotencyModule.forRoot({ purgeInterval: false })]);
    try {
      await request(app.getHttpServer()).post('/orders').expect(400);
      const before = runs;
      await request(app.getHttpServer()).post('/orders/drafts').expect(201);
      expect(runs - before).toBe(1);
    } finally {
      await app.close();
    }
  });

  it('fails at startup on a malformed option', async () => {
    await expect(
      boot([IdempotencyModule.forRoot({ ttl: '1 fortnight' } as IdempotencyModuleOptions)]),
    ).rejects.toThrow(/ttl must be/);
    expect(() => Idempotent({ lockTimeout: 'soon' })).toThrow(/lockTimeout must be/);
  });
});

@Controller('raw')
class RawResponseController {
  @Post()
  @Idempotent()
  write(@Res() response: any) {
    response.status(201).json({ written: 'by hand' });
  }

  @Sse('events')
  @Idempotent()
  events() {
    return of({ data: 'tick' });
  }

  @Post('next')
  @Idempotent()
  handOn(@Next() next: () => void) {
    next();
  }
}

describe('routes the interceptor cannot protect', () => {
  it('refuses @Idempotent() with @Res(), @Next() or @Sse() at startup, naming the routes', async () => {
    @Module({
      imports: [IdempotencyModule.forRoot({ purgeInterval: false })],
      controllers: [RawResponseController],
    })
    class AppModule {}
    const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
    const app = moduleRef.createNestApplication({ logger: false });
    const init = app.init();
    await expect(init).rejects.toThrow(
      /RawResponseController\.write: it writes the response itself/,
    );
    await expect(init).rejects.toThrow(
      /RawResponseController\.events: it streams server-sent events/,
    );
    await expect(init).rejects.toThrow(/RawResponseController\.handOn: it takes @Next\(\)/);
    await app.close().catch(() => undefined);
  });
});

describe.each(eachDatabase)('module setup on %s', (_name, database) => {
  it('opens DataSourceOptions itself, creates the table, and closes the connection on shutdown', async () => {
    const app = await boot([IdempotencyModule.forRoot({ dataSource: database.options() })]);
    await expectProtects(app);
    // The store is the one holder of the module's own connection.
    const owned = (app.get(IdempotencyStore) as unknown as { dataSource: DataSource }).dataSource;
    expect(owned.isInitialized).toBe(true);
    await app.close();
    expect(owned.isInitialized).toBe(false);
  });

  it('takes its options from DI with forRootAsync, and leaves the app DataSource open', async () => {
    const dataSource = new DataSource({ ...database.options(), entities: [IdempotencyRecord] });

    @Module({ providers: [{ provide: DataSource, useValue: dataSource }], exports: [DataSource] })
    class DatabaseModule {}

    const app = await boot([
      IdempotencyModule.forRootAsync({
        imports: [DatabaseModule],
        inject: [DataSource],
        useFactory: (injected: DataSource) => ({ dataSource: injected, ttl: '1h' }),
      }),
    ]);
    try {
      expect(dataSource.isInitialized).toBe(true);
      const key = await expectProtects(app);
      // By key: the table is shared with other spec files running at the same time.
      const record = await dataSource.getRepository(IdempotencyRecord).findOneByOrFail({ key });
      expect(record.expiresAt - Date.now()).toBeLessThanOrEqual(3_600_000);
      expect(record.expiresAt - Date.now()).toBeGreaterThan(3_500_000);
    } finally {
      await app.close();
    }
    expect(dataSource.isInitialized).toBe(true);
    await dataSource.destroy();
  });

  it('refuses at startup a DataSource that lacks the IdempotencyRecord entity', async () => {
    const dataSource = new DataSource(database.options());
    await expect(boot([IdempotencyModule.forRoot({ dataSource })])).rejects.toThrow(
      /IdempotencyRecord is not an entity/,
    );
    if (dataSource.isInitialized) await dataSource.destroy();
  });
});

describe.each(eachDatabase)('durations longer than a timer can wait, on %s', (_name, database) => {
  const DAY_MS = 86_400_000;

  it("works with storeTimeout, purgeInterval and waitTimeout of '30d', lockTimeout '90d' and ttl '365d'", async () => {
    const fixture = await createFixtureApp(database, {
      storeTimeout: '30d',
      purgeInterval: '30d',
      waitTimeout: '30d',
      lockTimeout: '90d',
      ttl: '365d',
    });
    try {
      // A timer past 2^31 - 1 ms would fire after 1 ms: every claim would time out at once.
      const key = newKey();
      const before = Date.now();
      fixture.gate.hold(key);
      const pending = post(fixture.http, '/slow', key).then((response) => response);
      await fixture.gate.arrived(key);
      const [claimed] = await recordsOf(fixture.dataSource, key);
      // ...the renewal (every lockTimeout / 3: 30 days) would renew the claim every millisecond...
      const expired = newKey();
      await post(fixture.http, '/short-ttl', expired).expect(201);
      const [short] = await recordsOf(fixture.dataSource, expired);
      await waitUntilPast(Number(short.expiresAt) + 100);
      const [running] = await recordsOf(fixture.dataSource, key);
      expect(Number(running.expiresAt)).toBe(Number(claimed.expiresAt));
      expect(Number(claimed.expiresAt)).toBeGreaterThanOrEqual(before + 90 * DAY_MS);
      // ...and the purge (every 30 days) would run every millisecond.
      if (database.ownTablePerConnection)
        expect(await recordsOf(fixture.dataSource, expired)).toHaveLength(1);
      fixture.gate.open(key);
      const first = await pending;
      expect(first.status).toBe(201);
      const [record] = await recordsOf(fixture.dataSource, key);
      expect(Number(record.expiresAt)).toBeGreaterThanOrEqual(before + 365 * DAY_MS);
      const replay = await post(fixture.http, '/slow', key);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(fixture.calls.count('slow', key)).toBe(1);
    } finally {
      await fixture.close();
    }
  });

  it('refuses at startup a duration too long to be meant, naming the option', async () => {
    await expect(createFixtureApp(database, { ttl: Number.MAX_SAFE_INTEGER })).rejects.toThrow(
      /ttl must be at most 100 years/,
    );
  });
});
