/**
 * Review of the operator tools: the CLI against stores it cannot open, and the replay cache of a
 * process whose LISTEN connection (which tells it what operators delete) is down or not up yet.
 */
import { Body, Controller, Module, Post, type INestApplication } from '@nestjs/common';
import { Test } from '@nestjs/testing';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import request from 'supertest';
import { DataSource } from 'typeorm';
import {
  IdempotencyAdmin,
  IdempotencyModule,
  IdempotencyRecord,
  Idempotent,
  type IdempotencyModuleOptions,
} from '../lib/index.js';
import { CapturedLog } from './support/captured-log.js';
import { TcpProxy } from './support/tcp-proxy.js';

const CLI = fileURLToPath(new URL('../dist/lib/admin/cli.js', import.meta.url));

/** Runs the compiled CLI; resolves to its exit code and output (it never rejects). */
function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [CLI, ...args],
      { env: { ...process.env, NODE_OPTIONS: '' }, timeout: 30_000 },
      (error, stdout, stderr) =>
        resolve({
          code: error ? (typeof error.code === 'number' ? error.code : null) : 0,
          stdout,
          stderr,
        }),
    );
  });
}

describe('the admin CLI against a store it cannot use', () => {
  it('an unreachable Redis: exit 1 with the cause, no stack trace, no endless reconnecting', async () => {
    const { code, stderr } = await cli(['list', '--url', 'redis://127.0.0.1:1']);
    // Before the fix: ioredis reconnected for ever (the process never exited, killed by the
    // timeout: code null) and printed "[ioredis] Unhandled error event" stack traces.
    expect(code).toBe(1);
    expect(stderr).toMatch(/cannot open the store at redis:\/\/127\.0\.0\.1:1.*ECONNREFUSED/);
    expect(stderr).not.toMatch(/^\s+at /m);
  }, 40_000);

  it('a sqlite: or pglite: path that does not exist is refused, and nothing is created there', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'review-admin-'));
    try {
      for (const url of [
        `sqlite:${join(dir, 'typo', 'app.db')}`,
        `pglite:${join(dir, 'typo-data')}`,
      ]) {
        const { code, stderr } = await cli(['list', '--url', url]);
        expect(code).toBe(1);
        expect(stderr).toMatch(/cannot open the store .*does not exist/);
        // Before the fix: an empty database (or a whole PGlite data dir) was created at the typo.
        expect(existsSync(join(dir, 'typo'))).toBe(false);
        expect(existsSync(join(dir, 'typo-data'))).toBe(false);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 40_000);

  it('an --older-than past the longest duration is a usage error (2), not a failure (1)', async () => {
    const { code, stderr } = await cli([
      'list',
      '--url',
      'sqlite::memory:',
      '--older-than',
      '99999999d',
    ]);
    expect(code).toBe(2);
    expect(stderr).toMatch(/--older-than .*100 years/);
  }, 40_000);
});

let runs = 0;

@Controller()
class ReviewAdminController {
  @Post('review-admin-orders')
  @Idempotent()
  order(@Body() body: { amount: number }) {
    runs++;
    return { run: runs, amount: body.amount };
  }
}

const DATABASE_URL = process.env.DATABASE_URL;
const describePostgres = DATABASE_URL ? describe : describe.skip;

describePostgres('the replay cache while the LISTEN connection is down (PostgreSQL)', () => {
  let proxy: TcpProxy;
  const opened: { app: INestApplication; dataSource: DataSource }[] = [];
  /** Nest's Logger is one for the whole process: the last app booted gets every app's lines. */
  let log: CapturedLog;

  /** An app on its own DataSource; `listenerUrl` through the proxy when `proxied`. */
  async function boot(proxied: boolean) {
    const dataSource = new DataSource({
      type: 'postgres',
      url: DATABASE_URL,
      entities: [IdempotencyRecord],
    });
    await dataSource.initialize();
    const options: Partial<IdempotencyModuleOptions> = {
      dataSource,
      ...(proxied ? { listenerUrl: proxy.proxiedUrl(DATABASE_URL!) } : {}),
    };
    @Module({
      imports: [IdempotencyModule.forRoot(options)],
      controllers: [ReviewAdminController],
    })
    class ReviewAdminModule {}
    const moduleRef = await Test.createTestingModule({ imports: [ReviewAdminModule] }).compile();
    const app = moduleRef.createNestApplication({ logger: log });
    await app.init();
    opened.push({ app, dataSource });
    return { app, admin: app.get(IdempotencyAdmin) };
  }

  const send = (app: INestApplication, key: string) =>
    request(app.getHttpServer())
      .post('/review-admin-orders')
      .set('Idempotency-Key', key)
      .send({ amount: 7 })
      .expect(201);

  async function logged(pattern: RegExp, count = 1): Promise<void> {
    const deadline = Date.now() + 15_000;
    while (log.lines.filter((line) => pattern.test(line.text)).length < count) {
      if (Date.now() > deadline) throw new Error(`never logged: ${pattern}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  beforeEach(async () => {
    log = new CapturedLog();
    const url = new URL(DATABASE_URL!);
    proxy = await TcpProxy.start({ host: url.hostname, port: Number(url.port || 5432) });
  });
  afterEach(async () => {
    for (const { app, dataSource } of opened.splice(0)) {
      await app.close();
      await dataSource.destroy();
    }
    await proxy.close();
  });

  it('a key forgotten while the connection was lost is not replayed from the cache', async () => {
    const a = await boot(true);
    const b = await boot(false);
    const key = `review-admin-${randomUUID()}`;
    const first = await send(a.app, key);
    expect((await send(a.app, key)).headers['idempotent-replayed']).toBe('true'); // cached in A
    await logged(/Listening for records that operators delete/);

    await proxy.cut();
    await logged(/Lost the LISTEN connection/);
    await b.admin.forget(key, { actor: 'review' });

    // Before the fix: A replayed the forgotten response from its cache until the connection came
    // back (the docs: "nothing deleted while it was not listening is replayed").
    const after = await send(a.app, key);
    expect(after.headers['idempotent-replayed']).toBeUndefined();
    expect(after.body.run).toBe(first.body.run + 1);

    // Back: it listens again, and what it replays is what the store holds.
    await proxy.restore();
    await logged(/replay cache emptied/);
    const again = await send(a.app, key);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(again.body).toEqual(after.body);
  }, 60_000);

  it('a key forgotten and run again (same payload) before the process first listened: its new response replays, not the cached one', async () => {
    await proxy.cut(); // A's LISTEN connection cannot open yet
    const a = await boot(true);
    const b = await boot(false);
    const key = `review-admin-${randomUUID()}`;
    const first = await send(a.app, key);
    expect((await send(a.app, key)).headers['idempotent-replayed']).toBe('true'); // cached in A
    await logged(/Could not open the LISTEN connection/);

    await b.admin.forget(key, { actor: 'review' });
    const rerun = await send(b.app, key);
    expect(rerun.body.run).toBe(first.body.run + 1);

    await proxy.restore();
    await logged(/Listening for records that operators delete: kept the cached records/);
    // Before the fix: the first listen kept A's cached record because its fingerprint (the
    // payload's) still matched the stored one, and A replayed the forgotten response.
    const replay = await send(a.app, key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toEqual(rerun.body);
  }, 60_000);
});
