/**
 * The published package as a user gets it. `npm pack` builds it (prepack) into a temporary folder;
 * then each fixture app under test/fixtures is copied next to it, installed from its own lockfile
 * (`npm ci`), and the tarball is installed on top (`npm install --no-save <tarball>`, so npm checks
 * our peer ranges against the app's NestJS). Each app imports the library by its package name,
 * boots in a process of its own and replays a request:
 *
 * - packed-esm-app: NestJS 12 on ESM, TypeORM 1.1, without @nestjs/swagger (an optional peer).
 * - packed-cjs-nest11-app: NestJS 11 on CommonJS, loading our ES module with require() (Node ≥ 20.19),
 *   TypeORM 1.1, with @nestjs/swagger 11 and @nestjs/typeorm 11 installed.
 * - packed-cjs-nest11-typeorm03-app: the same app on TypeORM 0.3.
 *
 * Slow (npm installs, from npm's cache after the first run): everything is installed once per run.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { cp, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { testDatabases } from './support/databases.js';
import { startAppProcess, type AppProcess } from './support/processes.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
/** `npm pack` compiles the library; `npm ci` of a fixture downloads what npm's cache lacks. */
const INSTALL_TIMEOUT_MS = 300_000;

const execFileAsync = promisify(execFile);

/** Runs npm in `cwd`; rejects with npm's output (an ERESOLVE peer conflict, say) if it fails. */
async function npm(args: string[], cwd: string): Promise<string> {
  const { stdout } = await execFileAsync('npm', args, {
    cwd,
    env: { ...process.env, NODE_OPTIONS: '' },
    maxBuffer: 64 * 1024 * 1024,
  });
  return stdout;
}

interface PackageFixture {
  /** Folder under test/fixtures, with its package.json and package-lock.json. */
  readonly dir: string;
  /** The app's script, under test/fixtures (copied into the installed fixture). */
  readonly app: string;
  readonly nestMajor: number;
  readonly typeormVersion: RegExp;
  /** @nestjs/swagger is installed, and the app serves its document at /docs-json. */
  readonly swagger: boolean;
  /**
   * The Content-Type of the library's problem responses as the client gets them. NestJS 11's
   * ExpressAdapter replaces any error Content-Type that does not start with application/json (and
   * logs a warning); NestJS 12 keeps application/problem+json. See README, "NestJS 11 on CommonJS".
   */
  readonly problemContentType: string;
}

const fixtures: PackageFixture[] = [
  {
    dir: 'packed-esm-app',
    app: 'packed-esm-app/app.mjs',
    nestMajor: 12,
    typeormVersion: /^1\.1\./,
    swagger: false,
    problemContentType: 'application/problem+json',
  },
  {
    dir: 'packed-cjs-nest11-app',
    app: 'packed-cjs-nest11-app/app.cjs',
    nestMajor: 11,
    typeormVersion: /^1\.1\./,
    swagger: true,
    problemContentType: 'application/json',
  },
  {
    dir: 'packed-cjs-nest11-typeorm03-app',
    app: 'packed-cjs-nest11-app/app.cjs',
    nestMajor: 11,
    typeormVersion: /^0\.3\./,
    swagger: true,
    problemContentType: 'application/json',
  },
];

/** The fixtures run on their default embedded PGlite, and on PostgreSQL when DATABASE_URL is set. */
const databases = testDatabases
  .filter((database) => database.name === 'pglite' || database.name === 'postgres')
  .map((database) => [database.name, database] as const);

let workDir: string;
let packedFiles: string[];

/** Where a fixture is installed: its folder in workDir, and the app script copied into it. */
const installed = (fixture: PackageFixture) => {
  const dir = join(workDir, fixture.dir);
  return { dir, script: join(dir, basename(fixture.app)) };
};

/** Copies a fixture next to the tarball, installs it from its lockfile, then the tarball on top. */
async function install(fixture: PackageFixture, tarball: string): Promise<void> {
  const { dir, script } = installed(fixture);
  await cp(join(ROOT, 'test/fixtures', fixture.dir), dir, { recursive: true });
  await cp(join(ROOT, 'test/fixtures', fixture.app), script);
  await npm(['ci', '--no-audit', '--no-fund', '--prefer-offline'], dir);
  await npm(['install', '--no-save', '--no-audit', '--no-fund', '--prefer-offline', tarball], dir);
}

/** Packs once, then installs every fixture at the same time (mostly waiting on npm's cache and disk). */
beforeAll(async () => {
  workDir = await mkdtemp(join(tmpdir(), 'nestjs-idempotency-package-'));
  const [packed] = JSON.parse(
    await npm(['pack', '--json', '--pack-destination', workDir], ROOT),
  ) as {
    filename: string;
    files: { path: string }[];
  }[];
  packedFiles = packed.files.map((file) => file.path).sort();
  await Promise.all(fixtures.map((fixture) => install(fixture, join(workDir, packed.filename))));
}, INSTALL_TIMEOUT_MS);

afterAll(async () => {
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

describe('npm pack', () => {
  it('holds the compiled library, its declarations, README, LICENSE and package.json, nothing else', () => {
    const unexpected = packedFiles.filter(
      (path) => !/^(package\.json|README\.md|LICENSE|dist\/package\/.+\.(js|d\.ts))$/.test(path),
    );
    expect(unexpected).toEqual([]);
    expect(packedFiles.filter((path) => path.includes('.spec.'))).toEqual([]);
    expect(packedFiles).toEqual(
      expect.arrayContaining([
        'LICENSE',
        'README.md',
        'package.json',
        'dist/package/index.js',
        'dist/package/index.d.ts',
        'dist/package/storage/typeorm/create-idempotency-records.migration.js',
        'dist/package/storage/typeorm/create-idempotency-records.migration.d.ts',
      ]),
    );
  });

  it('holds a compiled file and a declaration for every source file of lib/ (specs aside)', async () => {
    const sources = (await readdir(join(ROOT, 'lib'), { recursive: true }))
      .filter((path) => path.endsWith('.ts') && !path.endsWith('.spec.ts'))
      .map((path) => path.split('\\').join('/'));
    expect(sources.length).toBeGreaterThan(0);
    const expected = sources.flatMap((path) => [
      `dist/package/${path.replace(/\.ts$/, '.js')}`,
      `dist/package/${path.replace(/\.ts$/, '.d.ts')}`,
    ]);
    expect(expected.filter((path) => !packedFiles.includes(path))).toEqual([]);
  });

  it('points main, types and exports at files in the tarball', async () => {
    const manifest = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8'));
    const entryPoints = [
      manifest.main,
      manifest.types,
      manifest.exports['.'].types,
      manifest.exports['.'].default,
      manifest.exports['./testing'].types,
      manifest.exports['./testing'].default,
      manifest.exports['./client'].types,
      manifest.exports['./client'].default,
      manifest.exports['./conformance'].types,
      manifest.exports['./conformance'].default,
      manifest.exports['./bullmq'].types,
      manifest.exports['./bullmq'].default,
      manifest.bin['nestjs-idempotency-check'],
      manifest.bin['nestjs-idempotency'],
    ].map((path: string) => path.replace(/^\.\//, ''));
    expect(entryPoints.filter((path) => !packedFiles.includes(path))).toEqual([]);
    expect(manifest.type).toBe('module');
  });
});

describe.each(fixtures)('the packed tarball installed in $dir (NestJS $nestMajor)', (fixture) => {
  let appDir: string;
  let appScript: string;

  beforeAll(() => {
    ({ dir: appDir, script: appScript } = installed(fixture));
  });

  it(`shares the app's own NestJS ${fixture.nestMajor} and TypeORM: npm installed no copy of its own for the library`, async () => {
    const versionOf = async (name: string) =>
      JSON.parse(await readFile(join(appDir, 'node_modules', name, 'package.json'), 'utf8'))
        .version as string;
    expect(await versionOf('@nestjs/common')).toMatch(new RegExp(`^${fixture.nestMajor}\\.`));
    expect(await versionOf('typeorm')).toMatch(fixture.typeormVersion);
    expect(existsSync(join(appDir, 'node_modules/nestjs-idempotency/node_modules/@nestjs'))).toBe(
      false,
    );
    expect(existsSync(join(appDir, 'node_modules/nestjs-idempotency/node_modules/typeorm'))).toBe(
      false,
    );
    expect(existsSync(join(appDir, 'node_modules/@nestjs/swagger'))).toBe(fixture.swagger);
  });

  if (fixture.nestMajor === 12) {
    it('exports the store kit as nestjs-idempotency/testing; run with no test runner, the shipped store passes it', async () => {
      const script = join(appDir, 'store-kit.mjs');
      await cp(join(ROOT, 'test/fixtures/store-kit.mjs'), script);
      const { stdout } = await execFileAsync('node', [script], {
        cwd: appDir,
        env: { ...process.env, NODE_OPTIONS: '' },
      });
      const result = JSON.parse(stdout.trim().split('\n').at(-1)!);
      expect(result.failed).toEqual([]);
      expect(result.passed).toBeGreaterThanOrEqual(15);
    }, 60_000);
  }

  describe.each(databases)('on %s', (name, database) => {
    let app: AppProcess;

    beforeAll(async () => {
      const url = name === 'postgres' ? (database.options() as { url: string }).url : '';
      app = await startAppProcess(appScript, { DATABASE_URL: url });
    }, 60_000);
    afterAll(async () => {
      await app?.stop();
    });

    const postOrder = (key: string, body: object) =>
      fetch(`${app.baseUrl}/orders`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
        body: JSON.stringify(body),
      });
    const handlerRuns = async () =>
      ((await (await fetch(`${app.baseUrl}/orders/runs`)).json()) as { handlerRuns: number })
        .handlerRuns;

    if (fixture.nestMajor === 12) {
      it('ships nestjs-idempotency-check: run with npx from the app, every check passes on its /orders', async () => {
        const { stdout } = await execFileAsync(
          'npx',
          [
            '--no-install',
            'nestjs-idempotency-check',
            `${app.baseUrl}/orders`,
            '-d',
            '{"item":"tea"}',
          ],
          { cwd: appDir, env: { ...process.env, NODE_OPTIONS: '' } },
        );
        expect(stdout).toContain('7 checks: 7 passed, 0 failed, 0 skipped');
      }, 60_000);
    }

    it('replays a POST sent twice with one Idempotency-Key, and runs the handler once', async () => {
      const key = randomUUID();
      const runsBefore = await handlerRuns();

      const first = await postOrder(key, { amount: 1250 });
      const firstBody = await first.json();
      const second = await postOrder(key, { amount: 1250 });

      expect(first.status).toBe(201);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      expect(firstBody).toEqual({ id: expect.any(String), amount: 1250, status: 'accepted' });
      expect(second.status).toBe(201);
      expect(second.headers.get('idempotent-replayed')).toBe('true');
      expect(await second.json()).toEqual(firstBody);
      expect(await handlerRuns()).toBe(runsBefore + 1);
    });

    it("answers the key reused with another body with the library's 422 problem, as the app's own HttpException", async () => {
      const key = randomUUID();
      expect((await postOrder(key, { amount: 1 })).status).toBe(201);

      const reused = await postOrder(key, { amount: 2 });

      expect(reused.status).toBe(422);
      expect(reused.headers.get('content-type')).toMatch(
        new RegExp(`^${fixture.problemContentType.replace('+', '\\+')}`),
      );
      expect(await reused.json()).toMatchObject({
        type: 'tag:nestjs-idempotency,2026:key-reused',
        status: 422,
      });
    });

    (fixture.swagger ? it : it.skip)(
      "documents the Idempotency-Key header in the app's @nestjs/swagger document",
      async () => {
        const response = await fetch(`${app.baseUrl}/docs-json`);
        const document = (await response.json()) as {
          paths: Record<string, Record<string, { parameters: object[] }>>;
        };

        expect(response.status).toBe(200);
        expect(document.paths['/orders'].post.parameters).toContainEqual(
          expect.objectContaining({ name: 'Idempotency-Key', in: 'header', required: true }),
        );
      },
    );
  });
});
