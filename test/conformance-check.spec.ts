import type { INestApplication } from '@nestjs/common';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { checkConformance, type ConformanceReport } from '../lib/conformance/index.js';
import { createSampleApp } from '../sample/app.factory.js';
import { startConformingServer, startForgetfulServer } from './fixtures/draft-servers.js';
import { startNaiveServer } from './fixtures/naive-idempotency-server.js';

/**
 * `nestjs-idempotency-check`, the command the package ships, run as a process (the compiled
 * dist/lib/conformance/cli.js that `npm test` builds) against the sample shop, where every check
 * passes, and against endpoints that break the draft, where each broken rule is reported.
 */
const CLI = fileURLToPath(new URL('../dist/lib/conformance/cli.js', import.meta.url));
const PAYMENT = JSON.stringify({ amount: 1000, currency: 'eur', source: 'tok_visa' });
const ORDER = JSON.stringify({ customer: 'alice', items: [{ sku: 'tea', quantity: 1 }] });

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function check(...args: string[]): Promise<Run> {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm test\` (it compiles first)`);
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [CLI, ...args], {
      env: { ...process.env, NODE_OPTIONS: '' },
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

async function checkJson(...args: string[]): Promise<{ code: number; report: ConformanceReport }> {
  const run = await check(...args, '--json');
  return { code: run.code, report: JSON.parse(run.stdout) as ConformanceReport };
}

const statuses = (report: ConformanceReport) =>
  Object.fromEntries(report.checks.map((c) => [c.id, c.status]));

describe('nestjs-idempotency-check against the sample shop', () => {
  let app: INestApplication;
  let baseUrl: string;
  beforeAll(async () => {
    app = await createSampleApp({ dataDir: 'memory://', gatewayLatencyMs: 100, logger: false });
    await app.listen(0, '127.0.0.1');
    baseUrl = `http://127.0.0.1:${(app.getHttpServer().address() as AddressInfo).port}`;
  });
  afterAll(() => app.close());

  it('passes every check on POST /payments (waits for a duplicate in flight) and prints each section', async () => {
    const run = await check(`${baseUrl}/payments`, '--body', PAYMENT);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
    expect(run.stdout).toContain('draft-ietf-httpapi-idempotency-key-header-06');
    const lines = run.stdout.split('\n').filter((line) => /^(PASS|FAIL|SKIP)/.test(line));
    expect(lines.map((line) => line.slice(0, 10).trim())).toEqual([
      'PASS  §2.6',
      'PASS  §2.6',
      'PASS  §2.7',
      'PASS  §2.7',
      'PASS  §2.1',
      'PASS  §2.7',
      'PASS  §2.7',
    ]);
    expect(run.stdout).toContain('7 checks: 7 passed, 0 failed, 0 skipped');
  });

  it("passes every check on POST /orders (the module's defaults: 409 for a duplicate in flight)", async () => {
    const { code, report } = await checkJson(`${baseUrl}/orders`, '-d', ORDER);
    expect(statuses(report)).toEqual({
      'first-request': 'pass',
      replay: 'pass',
      'key-reuse': 'pass',
      'missing-key': 'pass',
      'key-syntax': 'pass',
      concurrent: 'pass',
      'problem-details': 'pass',
    });
    expect(code).toBe(0);
  });

  it('reports each failure on the same handler without @Idempotent()', async () => {
    const { code, report } = await checkJson(`${baseUrl}/payments/unprotected`, '-d', PAYMENT);
    expect(code).toBe(1);
    expect(statuses(report)).toEqual({
      'first-request': 'pass',
      replay: 'fail',
      'key-reuse': 'fail',
      'missing-key': 'fail',
      'key-syntax': 'fail',
      concurrent: 'fail',
      'problem-details': 'skip',
    });
    const concurrent = report.checks.find((c) => c.id === 'concurrent')!;
    expect(concurrent.detail).toContain('it ran more than once');
  });

  it('says what to fix when the body is not one the endpoint accepts', async () => {
    const run = await check(`${baseUrl}/payments`);
    expect(run.code).toBe(1);
    expect(run.stdout).toMatch(/FAIL {2}§2\.6 +A request with a new key is processed/);
    expect(run.stdout).toContain('pass a body the endpoint accepts (--body)');
  });
});

describe('nestjs-idempotency-check against a hand-written, non-conforming endpoint', () => {
  it('reports the replay status, the ignored payload, the race, the key syntax and the plain-JSON errors', async () => {
    const naive = await startNaiveServer(5);
    try {
      const { code, report } = await checkJson(naive.url, '--concurrency', '5');
      expect(code).toBe(1);
      expect(statuses(report)).toEqual({
        'first-request': 'pass',
        replay: 'fail',
        'key-reuse': 'fail',
        'missing-key': 'pass',
        'key-syntax': 'fail',
        concurrent: 'fail',
        'problem-details': 'fail',
      });
      const detail = (id: string) => report.checks.find((c) => c.id === id)!.detail;
      expect(detail('replay')).toMatch(/^first 201 .*, retry 200 /);
      expect(detail('key-reuse')).toMatch(/^got 200 .*expected 422$/);
      expect(detail('concurrent')).toContain('5 × 201 with different bodies');
      expect(detail('problem-details')).toBe('missing key: 400 application/json');
    } finally {
      await naive.close();
    }
  });

  it('refuses bad usage with exit code 2 and the usage text', async () => {
    const noUrl = await check();
    expect(noUrl.code).toBe(2);
    expect(noUrl.stderr).toContain('expected exactly one <url>');
    const badBody = await check('http://127.0.0.1:1/x', '--body', '{oops');
    expect(badBody.code).toBe(2);
    expect(badBody.stderr).toContain('--body is not JSON');
    const unreachable = await check('http://127.0.0.1:1/x');
    expect(unreachable.code).toBe(1);
    expect(unreachable.stderr).toContain('could not be reached');
  });

  it('refuses a method or a header name that is not an HTTP token as a usage error, and takes --timeout 1', async () => {
    const badMethod = await check('http://127.0.0.1:1/x', '-X', 'NOT A METHOD');
    expect(badMethod.code).toBe(2);
    expect(badMethod.stderr).toContain('not a valid HTTP method');
    const badHeader = await check('http://127.0.0.1:1/x', '-H', 'X Api Key: secret');
    expect(badHeader.code).toBe(2);
    expect(badHeader.stderr).toContain('invalid header name');
    const oneMs = await check('http://127.0.0.1:1/x', '--timeout', '1');
    expect(oneMs.stderr).not.toContain('--timeout must be');
    expect(oneMs.code).toBe(1);
  });
});

describe('nestjs-idempotency-check against hand-written endpoints that follow the draft, or seem to', () => {
  const allPass = {
    'first-request': 'pass',
    replay: 'pass',
    'key-reuse': 'pass',
    'missing-key': 'pass',
    'key-syntax': 'pass',
    concurrent: 'pass',
    'problem-details': 'pass',
  };

  it('never passes the replay or the race on an endpoint that is not idempotent at all, however strict its input checks', async () => {
    // It answers every execution alike and refuses the checker's extra member with 422: before,
    // every check passed (exit 0) while each request, replays included, ran the operation.
    const forgetful = await startForgetfulServer();
    try {
      const { code, report } = await checkJson(forgetful.url, '-d', '{"amount":1}');
      expect(code).toBe(1);
      expect(forgetful.executions()).toBeGreaterThan(5);
      const result = (id: string) => report.checks.find((c) => c.id === id)!;
      expect(result('replay').status).toBe('skip');
      expect(result('replay').detail).toContain('a new key got the same response');
      expect(result('concurrent').status).toBe('skip');
      expect(result('key-reuse').status).toBe('fail');
      expect(result('key-reuse').detail).toContain('--other-body');
    } finally {
      await forgetful.close();
    }
  });

  it('passes an endpoint that takes only RFC 8941 Strings ("key") as keys, and refuses bare ones', async () => {
    const strict = await startConformingServer({ keys: 'quoted' });
    try {
      const { code, report } = await checkJson(strict.url);
      expect(statuses(report)).toEqual(allPass);
      expect(code).toBe(0);
    } finally {
      await strict.close();
    }
  });

  it('runs every check with bare keys on an endpoint that refuses the quoted form, and fails only the syntax check', async () => {
    const bare = await startConformingServer({ keys: 'bare' });
    try {
      const { code, report } = await checkJson(bare.url);
      expect(statuses(report)).toEqual({ ...allPass, 'key-syntax': 'fail' });
      expect(report.checks.find((c) => c.id === 'key-syntax')!.detail).toBe(
        '"key" got 400 (a bare key got 201), an unterminated "key got 400 (expected 2xx and 400)',
      );
      expect(code).toBe(1);
    } finally {
      await bare.close();
    }
  });

  it('sends the -H headers in place of its own (a PATCH of merge-patch+json with a token), to a URL with a query', async () => {
    const token = `Bearer ${randomUUID()}:1`;
    const server = await startConformingServer({
      contentType: 'application/merge-patch+json',
      authorization: token,
    });
    try {
      const url = `${server.url}?tenant=a&dry=0`;
      const headers = ['-H', 'Content-Type: application/merge-patch+json'];
      const { code, report } = await checkJson(
        url,
        '-X',
        'patch',
        ...headers,
        '-H',
        `Authorization: ${token}`,
      );
      expect(report).toMatchObject({ method: 'PATCH', url });
      expect(statuses(report)).toEqual(allPass);
      expect(code).toBe(0);

      // Without the token: the first check says which option is missing.
      const unauthorised = await check(url, '-X', 'PATCH', ...headers);
      expect(unauthorised.code).toBe(1);
      expect(unauthorised.stdout).toContain('got 401');
      expect(unauthorised.stdout).toContain("-H 'Authorization: …'");
    } finally {
      await server.close();
    }
  });

  it('reports a duplicate that is never answered as a timeout of the concurrency check, and still reports every check', async () => {
    const hung = await startConformingServer({ hangOnDuplicate: true });
    try {
      const run = await check(hung.url, '--timeout', '1000', '--json');
      expect(run.stderr).toBe('');
      expect(run.code).toBe(1);
      const report = JSON.parse(run.stdout) as ConformanceReport;
      expect(statuses(report)).toEqual({ ...allPass, concurrent: 'fail' });
      const concurrent = report.checks.find((c) => c.id === 'concurrent')!;
      expect(concurrent.detail).toContain('4 × no answer (timed out after 1000 ms)');
      expect(hung.executions()).toBe(4);
    } finally {
      await hung.close();
    }
  });

  it('refuses a concurrency below 2 or a timeout that is not a positive number before sending anything', async () => {
    const server = await startConformingServer();
    try {
      for (const concurrency of [0, 1, 2.5, Number.NaN]) {
        await expect(checkConformance({ url: server.url, concurrency })).rejects.toThrow(
          /concurrency must be a whole number of 2 or more/,
        );
      }
      await expect(checkConformance({ url: server.url, timeoutMs: 0 })).rejects.toThrow(
        /timeoutMs must be a positive number of ms/,
      );
      expect(server.executions()).toBe(0);
    } finally {
      await server.close();
    }
  });
});
