import {
  ClassSerializerInterceptor,
  Controller,
  Headers,
  Module,
  Post,
  UseInterceptors,
  type INestApplication,
} from '@nestjs/common';
import { Reflector } from '@nestjs/core';
import { Test } from '@nestjs/testing';
import { Exclude } from 'class-transformer';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import {
  Idempotent,
  IdempotencyModule,
  IdempotencyRecord,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { FixtureController } from './fixtures/fixture.controller.js';
import { CallLog, HandlerGate } from './fixtures/handler-probes.js';
import { CapturedLog } from './support/captured-log.js';
import { testDatabases } from './support/databases.js';
import { newKey, post } from './support/http.js';

const KEY = 'idempotency-key';

class Account {
  readonly id = randomUUID();
  @Exclude()
  readonly passwordHash = `hash-${randomUUID()}`;
}

@Controller('accounts')
class AccountsController {
  constructor(private readonly calls: CallLog) {}

  /** Serialised by whatever serializer wraps it (global, in the test that sets one). */
  @Post()
  @Idempotent()
  create(@Headers(KEY) key: string) {
    this.calls.record('accounts', key);
    return new Account();
  }

  /** Serialised inside the idempotency interceptor: what is stored is what the client got. */
  @Post('inside')
  @UseInterceptors(ClassSerializerInterceptor)
  @Idempotent()
  createInside(@Headers(KEY) key: string) {
    this.calls.record('accounts-inside', key);
    return new Account();
  }
}

/** An app with the fixture routes and the accounts routes; `prepare` runs before `init()`. */
async function boot(
  options: IdempotencyModuleOptions,
  log: CapturedLog,
  prepare: (app: INestApplication) => void = () => undefined,
): Promise<{ app: INestApplication; close: () => Promise<void> }> {
  @Module({
    imports: [IdempotencyModule.forRoot({ purgeInterval: false, ...options })],
    controllers: [FixtureController, AccountsController],
    providers: [CallLog, HandlerGate],
  })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const app = moduleRef.createNestApplication({ logger: log });
  prepare(app);
  await app.init();
  return { app, close: () => app.close() };
}

function warnings(log: CapturedLog, from = 0): string[] {
  return log.lines
    .slice(from)
    .filter((line) => line.level === 'warn')
    .map((line) => line.text);
}

describe('the in-memory default under NODE_ENV=production', () => {
  const previous = process.env.NODE_ENV;
  beforeEach(() => (process.env.NODE_ENV = 'production'));
  afterEach(() => (process.env.NODE_ENV = previous));

  it('is refused at startup, with a message that says what to configure', async () => {
    await expect(boot({}, new CapturedLog())).rejects.toThrow(
      /NODE_ENV is production.*`dataSource`.*`store`.*allowInMemoryStore: true/s,
    );
  });

  it('starts when explicitly allowed, or with a DataSource', async () => {
    const allowed = await boot({ allowInMemoryStore: true }, new CapturedLog());
    await post(allowed.app.getHttpServer(), '/charges', newKey(), { amount: 1 }).expect(201);
    await allowed.close();

    const dataSource = new DataSource({
      ...testDatabases[0].options(),
      entities: [IdempotencyRecord],
    });
    const configured = await boot({ dataSource }, new CapturedLog());
    await post(configured.app.getHttpServer(), '/charges', newKey(), { amount: 1 }).expect(201);
    await configured.close();
    await dataSource.destroy();
  });

  it('is accepted outside production', async () => {
    process.env.NODE_ENV = 'development';
    const app = await boot({}, new CapturedLog());
    await app.close();
  });
});

describe('an authenticated caller on a route without a scope', () => {
  const log = new CapturedLog();
  let app: INestApplication;
  beforeAll(async () => {
    ({ app } = await boot({}, log, (nest) =>
      nest.use((request: any, _response: unknown, next: () => void) => {
        const user = request.headers['x-user'];
        if (user) request.user = { id: user };
        next();
      }),
    ));
  });
  afterAll(() => app.close());

  it('is warned about once per route, naming the route and the fix', async () => {
    const mark = log.lines.length;
    const http = app.getHttpServer();
    await post(http, '/charges', newKey(), { amount: 1 }).set('X-User', 'ann').expect(201);
    await post(http, '/charges', newKey(), { amount: 1 }).set('X-User', 'bob').expect(201);
    await post(http, '/declined', newKey()).set('X-User', 'ann').expect(402);
    const lines = warnings(log, mark);
    expect(lines).toHaveLength(2);
    expect(lines[0]).toContain('FixtureController.charge is called by an authenticated user');
    expect(lines[0]).toContain('scope');
    expect(lines[1]).toContain('FixtureController.declined');
  });

  it('is not warned about without a user, or on a route with a scope', async () => {
    const mark = log.lines.length;
    const http = app.getHttpServer();
    await post(http, '/charges', newKey(), { amount: 1 }).expect(201);
    await post(http, '/scoped', newKey()).set('X-User', 'ann').set('X-Api-Key', 'k1').expect(201);
    expect(warnings(log, mark)).toEqual([]);
  });
});

describe('a ClassSerializerInterceptor outside @Idempotent()', () => {
  it('global: warned at startup, and it is why — a replay sends the fields the serializer removed', async () => {
    const log = new CapturedLog();
    const { app, close } = await boot({}, log, (nest) =>
      nest.useGlobalInterceptors(new ClassSerializerInterceptor(nest.get(Reflector))),
    );
    try {
      const [warning, ...others] = warnings(log).filter((line) =>
        line.includes('ClassSerializerInterceptor'),
      );
      expect(others).toEqual([]);
      expect(warning).toContain('AccountsController.create');
      expect(warning).not.toContain('AccountsController.createInside');
      expect(warning).toContain('replays send those fields');

      const key = newKey();
      const first = await post(app.getHttpServer(), '/accounts', key).expect(201);
      expect(first.body.passwordHash).toBeUndefined();
      const replay = await post(app.getHttpServer(), '/accounts', key).expect(201);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.body.passwordHash).toMatch(/^hash-/);

      // Inside: stored after serialisation, so the replay is what the client first got.
      const inside = newKey();
      const firstInside = await post(app.getHttpServer(), '/accounts/inside', inside).expect(201);
      const replayInside = await post(app.getHttpServer(), '/accounts/inside', inside).expect(201);
      expect(replayInside.headers['idempotent-replayed']).toBe('true');
      expect(replayInside.body).toEqual(firstInside.body);
      expect(replayInside.body.passwordHash).toBeUndefined();
    } finally {
      await close();
    }
  });

  it('none: no warning', async () => {
    const log = new CapturedLog();
    const { close } = await boot({}, log);
    expect(warnings(log).filter((line) => line.includes('ClassSerializerInterceptor'))).toEqual([]);
    await close();
  });
});
