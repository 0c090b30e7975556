/**
 * The admin CLI as a user runs it: `npm pack`, the packed-esm-app fixture installed from its
 * lockfile with the tarball on top (as in test/package.spec.ts), the app running on PostgreSQL, and
 * `npx nestjs-idempotency …` run from the app's folder against its database.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startAppProcess, type AppProcess } from './support/processes.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const INSTALL_TIMEOUT_MS = 300_000;
const execFileAsync = promisify(execFile);
const databaseUrl = process.env.DATABASE_URL;
const env = { ...process.env, NODE_OPTIONS: '' };

async function npm(args: string[], cwd: string): Promise<string> {
  const { stdout } = await execFileAsync('npm', args, { cwd, env, maxBuffer: 64 * 1024 * 1024 });
  return stdout;
}

(databaseUrl ? describe : describe.skip)('npx nestjs-idempotency from the packed tarball', () => {
  let workDir: string;
  let appDir: string;
  let app: AppProcess;

  beforeAll(async () => {
    workDir = await mkdtemp(join(tmpdir(), 'nestjs-idempotency-admin-cli-'));
    const [packed] = JSON.parse(
      await npm(['pack', '--json', '--pack-destination', workDir], ROOT),
    ) as { filename: string }[];
    appDir = join(workDir, 'packed-esm-app');
    await cp(join(ROOT, 'test/fixtures/packed-esm-app'), appDir, { recursive: true });
    await npm(['ci', '--no-audit', '--no-fund', '--prefer-offline'], appDir);
    await npm(
      [
        'install',
        '--no-save',
        '--no-audit',
        '--no-fund',
        '--prefer-offline',
        join(workDir, packed.filename),
      ],
      appDir,
    );
    app = await startAppProcess(join(appDir, 'app.mjs'), { DATABASE_URL: databaseUrl! });
  }, INSTALL_TIMEOUT_MS);
  afterAll(async () => {
    await app?.stop();
    if (workDir) await rm(workDir, { recursive: true, force: true });
  });

  /** Runs the package's bin with npx in the app's folder; never rejects. */
  async function npx(args: string[]) {
    try {
      const { stdout, stderr } = await execFileAsync(
        'npx',
        ['--no-install', 'nestjs-idempotency', ...args, '--url', databaseUrl!],
        { cwd: appDir, env },
      );
      return { code: 0, stdout, stderr };
    } catch (error) {
      const failed = error as { code: number; stdout: string; stderr: string };
      return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
    }
  }
  const postOrder = (key: string) =>
    fetch(`${app.baseUrl}/orders`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      body: JSON.stringify({ amount: 12 }),
    });
  const handlerRuns = async () =>
    ((await (await fetch(`${app.baseUrl}/orders/runs`)).json()) as { handlerRuns: number })
      .handlerRuns;

  it('inspects a key of the running app, forgets it, and the next request runs the handler', async () => {
    const key = randomUUID();
    const first = await postOrder(key);
    expect(first.status).toBe(201);
    const firstBody = (await first.json()) as { id: string };

    const inspect = await npx(['inspect', key, '--actor', 'support-42']);
    expect(inspect.code).toBe(0);
    expect(inspect.stdout).toMatch(new RegExp(`^key +${key}$`, 'm'));
    expect(inspect.stdout).toMatch(/^endpoint +POST \/orders$/m);
    expect(inspect.stdout).toMatch(/^state +completed$/m);
    expect(inspect.stdout).toMatch(/^status +201$/m);
    expect(inspect.stdout).toMatch(/^fingerprint +[0-9a-f]{64}$/m);
    expect(inspect.stdout).not.toContain(firstBody.id);
    expect(inspect.stderr).toMatch(/inspect of key .* by "support-42": 1 record\(s\)/);

    const forget = await npx(['forget', key, '--actor', 'support-42']);
    expect(forget.code).toBe(0);
    expect(forget.stderr).toMatch(/forget of key .* on POST \/orders by "support-42": deleted/);

    const runsBefore = await handlerRuns();
    const next = await postOrder(key);
    expect(next.status).toBe(201);
    expect(next.headers.get('idempotent-replayed')).toBeNull();
    expect(((await next.json()) as { id: string }).id).not.toBe(firstBody.id);
    expect(await handlerRuns()).toBe(runsBefore + 1);

    const usage = await npx(['forget']);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain('forget takes exactly one <key>');
  }, 120_000);
});
