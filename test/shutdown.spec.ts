import { Controller, Headers, Module, Post } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { DataSource } from 'typeorm';
import { Idempotent, IdempotencyModule, IdempotencyRecord } from '../lib/index.js';
import { HandlerGate } from './fixtures/handler-probes.js';
import { testDatabases } from './support/databases.js';

const shared = testDatabases.filter((database) => database.shared);
const describeShared =
  shared.length > 0
    ? describe.each(shared.map((d) => [d.name, d] as const))
    : describe.skip.each([['no shared database (set DATABASE_URL)', undefined]]);

@Controller()
class SlowController {
  constructor(private readonly gate: HandlerGate) {}

  @Post('slow')
  @Idempotent()
  async slow(@Headers('idempotency-key') key: string) {
    await this.gate.pass(key);
    return { id: randomUUID() };
  }
}

describeShared('graceful shutdown on %s', (_name, database) => {
  it('stores the result of a request still running when app.close() is called', async () => {
    @Module({
      // DataSourceOptions: the module owns this connection and closes it at shutdown.
      imports: [IdempotencyModule.forRoot({ dataSource: database!.options() })],
      controllers: [SlowController],
      providers: [HandlerGate],
    })
    class AppModule {}
    const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
    const app = moduleRef.createNestApplication({ logger: false });
    await app.init();
    const gate = app.get(HandlerGate);

    const key = randomUUID();
    gate.hold(key);
    const pending = request(app.getHttpServer()).post('/slow').set('Idempotency-Key', key);
    const response = pending.then((r) => r);
    await gate.arrived(key);
    const closed = app.close();
    gate.open(key);
    expect((await response).status).toBe(201);
    await closed;

    const observer = new DataSource({ ...database!.options(), entities: [IdempotencyRecord] });
    await observer.initialize();
    try {
      const record = await observer.getRepository(IdempotencyRecord).findOneByOrFail({ key });
      expect(record.state).toBe('completed');
      expect(JSON.parse(record.responseBody!)).toEqual((await response).body);
    } finally {
      await observer.destroy();
    }
  });
});
