import { Controller, Module, Post } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { TypeOrmModule, getDataSourceToken } from '@nestjs/typeorm';
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { DataSource } from 'typeorm';
import {
  CreateIdempotencyRecords1763900000000,
  IdempotencyRecordsExactIds1767000000000,
  IdempotencyRecordsHotCompletion1768000000000,
  Idempotent,
  IdempotencyModule,
  IdempotencyRecord,
} from '../lib/index.js';
import { eachDatabase, testDatabases } from './support/databases.js';

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
async function bootWithTypeOrm(options: object, connection?: string, moduleOptions: object = {}) {
  @Module({
    imports: [
      TypeOrmModule.forRoot({ ...options, name: connection, autoLoadEntities: true }),
      TypeOrmModule.forFeature([IdempotencyRecord], connection),
      IdempotencyModule.forRootAsync({
        inject: [getDataSourceToken(connection)],
        useFactory: (dataSource: DataSource) => ({
          dataSource,
          purgeInterval: false,
          ...moduleOptions,
        }),
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
      const first = await request(app.getHttpServer())
        .post('/invoices')
        .set('Idempotency-Key', key);
      const retry = await request(app.getHttpServer())
        .post('/invoices')
        .set('Idempotency-Key', key);
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

/** A database with no idempotency table yet: its options, its migrations table, and cleaning up. */
interface FreshDatabase {
  readonly options: object;
  readonly migrationsTable: string;
  prepare(): Promise<void>;
  cleanUp(): Promise<void>;
}

/** A new SQLite file; PostgreSQL in a schema of its own. */
const freshDatabases = testDatabases.flatMap(
  (database): (readonly [string, () => FreshDatabase])[] => {
    if (database.name === 'sqlite') {
      return [
        [
          database.name,
          () => {
            const options = database.options();
            return {
              options,
              migrationsTable: 'migrations',
              prepare: async () => undefined,
              cleanUp: async () => undefined,
            };
          },
        ],
      ];
    }
    if (database.name !== 'postgres') return [];
    return [
      [
        database.name,
        () => {
          const schema = `user_migrations_${randomUUID().slice(0, 8)}`;
          const admin = () => new DataSource(database.options());
          const run = async (sql: string) => {
            const connection = await admin().initialize();
            try {
              await connection.query(sql);
            } finally {
              await connection.destroy();
            }
          };
          return {
            options: { ...database.options(), schema },
            migrationsTable: `${schema}.migrations`,
            prepare: () => run(`CREATE SCHEMA ${schema}`),
            cleanUp: () => run(`DROP SCHEMA ${schema} CASCADE`),
          };
        },
      ],
    ];
  },
);

/**
 * The app runs the table's migration itself (`migrationsRun`, the class among its `migrations`)
 * and the module does not (`runMigrations: false`).
 */
describe.each(freshDatabases)('a migration the app runs itself, on %s', (_name, fresh) => {
  it('creates the table through migrationsRun; the module runs none and works on it', async () => {
    const database = fresh();
    await database.prepare();
    try {
      const app = await bootWithTypeOrm(
        {
          ...database.options,
          migrations: [
            CreateIdempotencyRecords1763900000000,
            IdempotencyRecordsExactIds1767000000000,
            IdempotencyRecordsHotCompletion1768000000000,
          ],
          migrationsRun: true,
        },
        undefined,
        { runMigrations: false },
      );
      try {
        const dataSource = app.get<DataSource>(getDataSourceToken());
        const executed: { name: string }[] = await dataSource.query(
          `SELECT name FROM ${database.migrationsTable}`,
        );
        expect(executed.map((row) => row.name).sort()).toEqual([
          'CreateIdempotencyRecords1763900000000',
          'IdempotencyRecordsExactIds1767000000000',
          'IdempotencyRecordsHotCompletion1768000000000',
        ]);
        const key = randomUUID();
        const before = runs;
        await request(app.getHttpServer())
          .post('/invoices')
          .set('Idempotency-Key', key)
          .expect(201);
        const retry = await request(app.getHttpServer())
          .post('/invoices')
          .set('Idempotency-Key', key);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(runs - before).toBe(1);
        expect(await dataSource.getRepository(IdempotencyRecord).countBy({ key })).toBe(1);
      } finally {
        await app.close();
      }
    } finally {
      await database.cleanUp();
    }
  });
});
