import type { INestApplication } from '@nestjs/common';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import request from 'supertest';
import { createSampleApp } from '../sample/app.factory.js';

/**
 * The sample's PGlite folder and its `<folder>.lock`: one process at a time, and a lock left by a
 * process that is gone does not keep the shop from starting.
 */
describe('the sample shop on a PGlite folder and its lock file', () => {
  let dataDir: string;
  const lockPath = () => `${dataDir}.lock`;
  let app: INestApplication | undefined;
  let other: ChildProcess | undefined;

  beforeEach(() => {
    dataDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-lock-'));
  });
  afterEach(async () => {
    await app?.close();
    app = undefined;
    other?.kill('SIGKILL');
    other = undefined;
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(lockPath(), { force: true });
  });

  it('starts on a folder whose lock names its own pid (a container restarted after a kill runs under the same pid)', async () => {
    writeFileSync(lockPath(), String(process.pid));
    app = await createSampleApp({ dataDir, gatewayLatencyMs: 0, logger: false });
    await app.init();
    await request(app.getHttpServer()).get('/accounts/acc_alice').expect(200);
    await app.close();
    app = undefined;
    expect(existsSync(lockPath())).toBe(false);
  }, 60_000);

  it('refuses a folder that another live process holds, naming it', async () => {
    other = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
    writeFileSync(lockPath(), String(other.pid));
    await expect(createSampleApp({ dataDir, gatewayLatencyMs: 0, logger: false })).rejects.toThrow(
      `is in use by process ${other.pid}`,
    );
    expect(existsSync(lockPath())).toBe(true);
  }, 60_000);
});
