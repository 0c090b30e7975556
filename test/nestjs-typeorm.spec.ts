import {
  Controller,
  Module,
  Post,
  type INestApplication,
  type LoggerService,
} from '@nestjs/common';
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
async function bootWithTypeOrm(
  options: object,
  connection?: string,
  moduleOptions: object = {},
  logger?: LoggerService,
) {
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
  const builder = Test.createTestingModule({ imports: [AppModule] });
  const moduleRef = await (logger ? builder.setLogger(logger) : builder).compile();
  const app = moduleRef.createNestApplication({ logger: false });
  await app.init();
  return app;
}

/** Two requests with one new key: the first runs the handler (201), the second replays it. */
async function expectRunOnceThenReplayed(app: INestApplication, key: string) {
  const before = runs;
  await request(app.getHttpServer()).post('/invoices').set('Idempotency-Key', key).expect(201);
  const retry = await request(app.getHttpServer()).post('/invoices').set('Idempotency-Key', key);
  expect(retry.status).toBe(201);
  expect(retry.headers['idempotent-replayed']).toBe('true');
  expect(runs - before).toBe(1);
}

describe.each(eachDatabase)('with @nestjs/typeorm on %s', (_name, database) => {
  it.each([
    ['the default connection', undefined],
    ['a named connection', 'billing'],
  ])('reuses the app DataSource of %s, with autoLoadEntities', async (_case, connection) => {
    const app = await bootWithTypeOrm(database.options(), connection);
    try {
      const key = randomUUID();
      await expectRunOnceThenReplayed(app, key);
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
  /**
   * Boots the app on a fresh database with the app's own TypeORM options and `runMigrations: false`,
   * then runs `check` with the app, the warnings the module logged about it and the database's
   * migrations table; closes and cleans up whatever `check` does.
   */
  async function onFreshDatabase(
    typeOrmOptions: object,
    check: (app: INestApplication, warnings: string[], migrationsTable: string) => Promise<void>,
  ) {
    const database = fresh();
    await database.prepare();
    const logged = collectLogs();
    try {
      const app = await bootWithTypeOrm(
        { ...database.options, ...typeOrmOptions },
        undefined,
        { runMigrations: false },
        logged.logger,
      );
      try {
        const warnings = logged.filter((line) => line.includes('runMigrations: false'));
        await check(app, warnings, database.migrationsTable);
      } finally {
        await app.close();
      }
    } finally {
      await database.cleanUp();
    }
  }

  it('creates the table through migrationsRun; the module runs none and works on it', () =>
    onFreshDatabase(
      { migrations: ALL_MIGRATIONS, migrationsRun: true },
      async (app, warnings, migrationsTable) => {
        expect(warnings).toEqual([]);
        const dataSource = app.get<DataSource>(getDataSourceToken());
        const executed: { name: string }[] = await dataSource.query(
          `SELECT name FROM ${migrationsTable}`,
        );
        expect(executed.map((row) => row.name).sort()).toEqual([
          'CreateIdempotencyRecords1763900000000',
          'IdempotencyRecordsExactIds1767000000000',
          'IdempotencyRecordsHotCompletion1768000000000',
        ]);
        const key = randomUUID();
        await expectRunOnceThenReplayed(app, key);
        expect(await dataSource.getRepository(IdempotencyRecord).countBy({ key })).toBe(1);
      },
    ));

  it('warns at startup when the app has not run them yet; keyed requests get 503 until it has, then work', () =>
    // The app runs its migrations itself, after the module has started (before `listen`).
    onFreshDatabase({ migrations: ALL_MIGRATIONS, migrationsRun: false }, async (app, warnings) => {
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatch(
        /the table \S*idempotency_records cannot be read \(the database said: .+\)/,
      );
      for (const migration of ALL_MIGRATIONS) expect(warnings[0]).toContain(migration.name);

      const key = randomUUID();
      const before = runs;
      const refused = await request(app.getHttpServer())
        .post('/invoices')
        .set('Idempotency-Key', key);
      expect(refused.status).toBe(503);
      expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(runs - before).toBe(0);

      await app.get<DataSource>(getDataSourceToken()).runMigrations();
      await expectRunOnceThenReplayed(app, key);
    }));

  it('warns at startup when the table lacks the latest migration (purge_at)', () =>
    onFreshDatabase(
      { migrations: ALL_MIGRATIONS.slice(0, 2), migrationsRun: true },
      async (app, warnings) => {
        expect(warnings).toHaveLength(1);
        expect(warnings[0]).toContain(
          'has no column purge_at (added by IdempotencyRecordsHotCompletion1768000000000; the database said:',
        );
        const before = runs;
        await request(app.getHttpServer())
          .post('/invoices')
          .set('Idempotency-Key', randomUUID())
          .expect(503);
        expect(runs - before).toBe(0);
      },
    ));
});

const postgres = testDatabases.find((database) => database.name === 'postgres');

// The store names its table without a schema, so PostgreSQL finds it through the search path: so
// does the check (a deploy that migrated into a later schema of the app role's search path).
(postgres ? describe : describe.skip)('the startup check on PostgreSQL', () => {
  it('finds a table in a later schema of the search path, as the store does: no warning', async () => {
    const suffix = randomUUID().slice(0, 8);
    const [first, second] = [`sp_first_${suffix}`, `sp_second_${suffix}`];
    const admin = await new DataSource(postgres!.options() as never).initialize();
    try {
      await admin.query(`CREATE SCHEMA ${first}; CREATE SCHEMA ${second}`);
      const deploy = await new DataSource({
        ...(postgres!.options() as object),
        schema: second,
        entities: [IdempotencyRecord],
        migrations: ALL_MIGRATIONS,
        migrationsTableName: 'migrations',
      } as never).initialize();
      await deploy.runMigrations();
      await deploy.destroy();
      const logged = collectLogs();
      const app = await bootWithTypeOrm(
        {
          ...(postgres!.options() as object),
          extra: { options: `-c search_path=${first},${second}` },
        },
        undefined,
        { runMigrations: false },
        logged.logger,
      );
      try {
        expect(logged.filter((line) => line.includes('runMigrations: false'))).toEqual([]);
        await expectRunOnceThenReplayed(app, randomUUID());
      } finally {
        await app.close();
      }
    } finally {
      await admin.query(
        `DROP SCHEMA IF EXISTS ${first} CASCADE; DROP SCHEMA IF EXISTS ${second} CASCADE`,
      );
      await admin.destroy();
    }
  });
});

const ALL_MIGRATIONS = [
  CreateIdempotencyRecords1763900000000,
  IdempotencyRecordsExactIds1767000000000,
  IdempotencyRecordsHotCompletion1768000000000,
];

/** A logger for the testing module that keeps every line (the module logs through it at startup). */
function collectLogs(): string[] & { logger: LoggerService } {
  const logged: string[] = [];
  const collect = (message: unknown) => void logged.push(String(message));
  const logger = { log: collect, warn: collect, error: collect, debug: collect, verbose: collect };
  return Object.assign(logged, { logger });
}
