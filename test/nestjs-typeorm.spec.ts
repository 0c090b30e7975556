import { Controller, Module, Post } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { TypeOrmModule, getDataSourceToken } from '@nestjs/typeorm';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import type { DataSource } from 'typeorm';
import { Idempotent, IdempotencyModule, IdempotencyRecord } from '../lib/index.js';
import { eachDatabase } from './support/databases.js';

let runs = 0;

@Controller('invoices')
class InvoicesController {
  @Post()
  @Idempotent()
  create() {
    runs++;
    return { id: randomUUID() };
  }
}

/** Boots an app whose DataSource comes from @nestjs/typeorm, under `connection` (default or named). */
async function bootWithTypeOrm(options: object, connection?: string) {
  @Module({
    imports: [
      TypeOrmModule.forRoot({ ...options, name: connection, autoLoadEntities: true }),
      TypeOrmModule.forFeature([IdempotencyRecord], connection),
      IdempotencyModule.forRootAsync({
        inject: [getDataSourceToken(connection)],
        useFactory: (dataSource: DataSource) => ({ dataSource, purgeInterval: false }),
      }),
    ],
    controllers: [InvoicesController],
  })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const app = moduleRef.createNestApplication({ logger: false });
  await app.init();
  return app;
}

describe.each(eachDatabase)('with @nestjs/typeorm on %s', (_name, database) => {
  it.each([
    ['the default connection', undefined],
    ['a named connection', 'billing'],
  ])('reuses the app DataSource of %s, with autoLoadEntities', async (_case, connection) => {
    const app = await bootWithTypeOrm(database.options(), connection);
    try {
      const key = randomUUID();
      const before = runs;
      const first = await request(app.getHttpServer()).post('/invoices').set('Idempotency-Key', key);
      const retry = await request(app.getHttpServer()).post('/invoices').set('Idempotency-Key', key);
      expect(first.status).toBe(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(runs - before).toBe(1);
      const dataSource = app.get<DataSource>(getDataSourceToken(connection));
      expect(await dataSource.getRepository(IdempotencyRecord).countBy({ key })).toBe(1);
    } finally {
      await app.close();
    }
  });
});
