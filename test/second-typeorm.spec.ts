import { Controller, Module, Post } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import { cpSync, existsSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import request from 'supertest';
import type { DataSource, EntityManager } from 'typeorm';
import {
  Idempotent,
  IdempotencyModule,
  IdempotencyRecord,
  IdempotentTransaction,
} from '../lib/index.js';
import { eachDatabase } from './support/databases.js';

/**
 * The app's TypeORM is another copy than the one the library imports: `npm link`, a workspace that
 * did not hoist both to one folder, pnpm resolving the peer twice. Its DataSource is still the
 * app's DataSource: the library must use it (TypeORM's own cross-copy check), not take it for
 * options and open a connection of its own. The copy is of the same version (two versions in one
 * process share TypeORM's global metadata store, which mixed 0.3 and 1.x copies do not survive).
 */
const original = join(process.cwd(), 'node_modules/typeorm');
const { version } = JSON.parse(readFileSync(join(original, 'package.json'), 'utf8')) as {
  version: string;
};
const copy = join(
  process.cwd(),
  `node_modules/.cache/second-typeorm-${version}/node_modules/typeorm`,
);
if (!existsSync(copy)) {
  // Copied beside, then renamed: a run killed while copying leaves no half copy here, and of two
  // runs copying at once the second to rename uses the first's copy.
  const partial = `${copy}.${process.pid}`;
  cpSync(original, partial, { recursive: true });
  try {
    renameSync(partial, copy);
  } catch (error) {
    rmSync(partial, { recursive: true, force: true });
    if (!existsSync(join(copy, 'package.json'))) throw error;
  }
}
const secondTypeorm = createRequire(join(copy, 'package.json'))(
  'typeorm',
) as typeof import('typeorm');

let runs = 0;

@Controller('orders')
class OrdersController {
  @Post()
  @Idempotent()
  create() {
    runs++;
    return { id: randomUUID() };
  }
}

@Controller('transfers')
class TransfersController {
  /** Transactional: the stored response is written through the other copy's EntityManager. */
  @Post()
  @Idempotent({ transactional: true })
  async createInTransaction(@IdempotentTransaction() manager: EntityManager) {
    runs++;
    const [{ now }] = await manager.query('SELECT 1 AS now');
    return { id: randomUUID(), now: Number(now) };
  }
}

describe.each(eachDatabase)(
  'an app DataSource of another TypeORM copy, on %s',
  (name, database) => {
    // better-sqlite3 shares one connection: the module refuses transactional routes there.
    const paths = name === 'sqlite' ? ['/orders'] : ['/orders', '/transfers'];

    it(`is the one the module uses: the table, the run and the replay are in it (${paths.join(', ')})`, async () => {
      const { DataSource: LibrarysDataSource } = await import('typeorm');
      expect(secondTypeorm.DataSource).not.toBe(LibrarysDataSource);
      const dataSource: DataSource = new secondTypeorm.DataSource({
        ...database.options(),
        entities: [IdempotencyRecord],
      } as never) as never;
      await dataSource.initialize();
      try {
        @Module({
          imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false })],
          controllers:
            name === 'sqlite' ? [OrdersController] : [OrdersController, TransfersController],
        })
        class AppModule {}
        const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
        const app = moduleRef.createNestApplication({ logger: false });
        await app.init();
        try {
          for (const path of paths) {
            const key = randomUUID();
            const before = runs;
            const first = await request(app.getHttpServer()).post(path).set('Idempotency-Key', key);
            const retry = await request(app.getHttpServer()).post(path).set('Idempotency-Key', key);
            expect([path, first.status, retry.status]).toEqual([path, 201, 201]);
            expect(retry.headers['idempotent-replayed']).toBe('true');
            expect(retry.body).toEqual(first.body);
            expect(runs - before).toBe(1);
            // The record is in the app's own database, completed (not in one the module opened).
            const records = await dataSource.getRepository(IdempotencyRecord).findBy({ key });
            expect(records.map((record) => record.state)).toEqual(['completed']);
          }
        } finally {
          await app.close();
        }
        // The module leaves the app's DataSource open: it is the app's to close.
        expect(dataSource.isInitialized).toBe(true);
      } finally {
        if (dataSource.isInitialized) await dataSource.destroy();
      }
    });
  },
);
