/**
 * The operator's controls across processes: three app processes on one PostgreSQL (NOTIFY) or one
 * Redis (pub/sub), and the admin CLI (`node dist/lib/admin/cli.js`, as the package's bin runs it)
 * forgetting and releasing keys. A forgotten key runs its handler on the next request in each
 * process, even where that process had the old response in its replay cache; a key released while
 * its handler still runs lets the next request run, and the first handler's completion is refused
 * and logged.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startAppProcess, type AppProcess } from './support/processes.js';

const CLI = fileURLToPath(new URL('../dist/lib/admin/cli.js', import.meta.url));
const execFileAsync = promisify(execFile);

interface Backend {
  readonly name: string;
  /** The app processes' environment. */
  readonly env: Record<string, string>;
  /** The CLI's --url. */
  readonly url: string;
  /** The CLI's --prefix (Redis). */
  readonly prefix?: string;
}

const redisPrefix = `admin-processes-${randomUUID().slice(0, 8)}:`;
const backends: Backend[] = [
  ...(process.env.DATABASE_URL
    ? [
        {
          name: 'PostgreSQL',
          env: { DATABASE_URL: process.env.DATABASE_URL, REDIS_URL: '' },
          url: process.env.DATABASE_URL,
        },
      ]
    : []),
  ...(process.env.REDIS_URL
    ? [
        {
          name: 'Redis',
          env: { REDIS_URL: process.env.REDIS_URL, REDIS_PREFIX: redisPrefix, DATABASE_URL: '' },
          url: process.env.REDIS_URL,
          prefix: redisPrefix,
        },
      ]
    : []),
];
const describeBackends =
  backends.length > 0
    ? describe.each(backends)
    : describe.skip.each([{ name: 'no server (set DATABASE_URL or REDIS_URL)', env: {}, url: '' }]);

/** Runs the admin CLI; resolves to its exit code and output (it never rejects). */
async function cli(
  url: string,
  args: string[],
  prefix?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileAsync(
      process.execPath,
      [CLI, ...args, '--url', url, ...(prefix ? ['--prefix', prefix] : [])],
      { env: { ...process.env, NODE_OPTIONS: '' } },
    );
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

/** Resolves once `condition` holds (its handler has started, say); rejects after 10 s. */
async function until(condition: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error('the condition did not hold within 10 s');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const INVALIDATED = /An operator deleted a record: dropped from the replay cache/g;
const LISTENING = /Listening for records that operators delete/;

describeBackends('three app processes on one $name', ({ env, url, prefix }: Backend) => {
  let processes: AppProcess[] = [];

  beforeAll(async () => {
    processes = await Promise.all(
      [0, 1, 2].map(() => startAppProcess('test/fixtures/admin-server.js', env)),
    );
  }, 60_000);
  afterAll(async () => {
    // A slow handler left running (a failed test) would hold its process's shutdown.
    await Promise.all(
      processes.map((p) => fetch(`${p.baseUrl}/slow/finish`, { method: 'POST' }).catch(() => 0)),
    );
    await Promise.all(processes.map((p) => p.stop()));
  });

  const post = (process: AppProcess, path: string, key: string, body: object) =>
    fetch(`${process.baseUrl}${path}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      body: JSON.stringify(body),
    });
  const order = async (process: AppProcess, key: string) => {
    const response = await post(process, '/orders', key, { amount: 5 });
    return {
      status: response.status,
      replayed: response.headers.get('idempotent-replayed') === 'true',
      body: (await response.json()) as { id: string; pid: number },
    };
  };
  const runs = async (process: AppProcess) =>
    ((await (await fetch(`${process.baseUrl}/runs`)).json()) as { runs: number }).runs;
  const invalidations = (process: AppProcess) => process.output().match(INVALIDATED)?.length ?? 0;
  /** Resolves once each process has received `more` invalidations beyond the `seen` ones. */
  const invalidationsReach = (seen: number[], more: number) =>
    Promise.all(
      processes.map((p, i) =>
        p.waitForOutput(new RegExp(`(${INVALIDATED.source}[^]*){${seen[i] + more}}`)),
      ),
    );

  it('a key forgotten with the CLI runs its handler on the next request in each of the three processes, though each had its response cached', async () => {
    const key = randomUUID();
    const first = await order(processes[0], key);
    expect(first).toMatchObject({ status: 201, replayed: false });
    let current = first.body;
    const seen = processes.map(invalidations);
    let forgotten = 0;

    // A process listens for invalidations from the first record it caches on.
    for (const p of processes)
      expect(await order(p, key)).toEqual({ status: 201, replayed: true, body: current });
    await Promise.all(processes.map((p) => p.waitForOutput(LISTENING)));

    for (const [i, target] of processes.entries()) {
      // Every process replays the current response, and so holds it in its replay cache.
      for (const p of processes)
        expect(await order(p, key)).toEqual({ status: 201, replayed: true, body: current });

      const before = await runs(target);
      const forget = await cli(url, ['forget', key, '--actor', `ticket-${i}`], prefix);
      expect(forget.code).toBe(0);
      expect(forget.stdout).toContain('forgotten: the next request with this key runs the handler');
      expect(forget.stderr).toMatch(
        new RegExp(`forget of key .* on POST /orders by "ticket-${i}": deleted`),
      );
      forgotten++;
      await invalidationsReach(seen, forgotten);

      const next = await order(target, key);
      expect(next.status).toBe(201);
      expect(next.replayed).toBe(false);
      expect(next.body.id).not.toBe(current.id);
      expect(await runs(target)).toBe(before + 1);
      current = next.body;
      for (const p of processes)
        expect(await order(p, key)).toEqual({ status: 201, replayed: true, body: current });
    }
  }, 60_000);

  it('inspect shows the record; forget of an unknown key or of an in-progress one is refused (exit 1), nothing changed', async () => {
    const key = randomUUID();
    await order(processes[1], key);
    const inspect = await cli(url, ['inspect', key, '--json', '--body'], prefix);
    expect(inspect).toMatchObject({ code: 0, stderr: expect.stringContaining('1 record(s)') });
    const [record] = JSON.parse(inspect.stdout) as Record<string, unknown>[];
    expect(record).toMatchObject({
      key,
      endpoint: 'POST /orders',
      scope: '',
      state: 'completed',
      status: 201,
      fingerprint: expect.stringMatching(/^[0-9a-f]{64}$/),
      createdAt: expect.any(String),
      lockedUntil: null,
      expiresAt: expect.any(String),
      bodyEncoding: 'json',
    });
    expect(JSON.parse(record.body as string)).toMatchObject({ pid: expect.any(Number), amount: 5 });

    const unknown = await cli(url, ['forget', randomUUID()], prefix);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('forget refused: no record has key');
    const release = await cli(url, ['release', key], prefix);
    expect(release.code).toBe(1);
    expect(release.stderr).toContain('release refused: the record is completed');
    expect(await order(processes[2], key)).toMatchObject({ status: 201, replayed: true });
  }, 60_000);

  it('a key released while its handler still runs: the next request runs it, and the first completion is refused and logged', async () => {
    const key = randomUUID();
    const [first, second, third] = processes;
    const firstRuns = await runs(first);
    const stuck = post(first, '/slow', key, { amount: 7 });
    await until(async () => (await runs(first)) > firstRuns);

    const listed = await cli(
      url,
      ['list', '--in-progress', '--older-than', '0s', '--endpoint', 'POST /slow', '--json'],
      prefix,
    );
    expect(listed.code).toBe(0);
    expect(JSON.parse(listed.stdout)).toContainEqual(
      expect.objectContaining({ key, state: 'in_progress', endpoint: 'POST /slow' }),
    );
    const release = await cli(url, ['release', key, '--actor', 'oncall'], prefix);
    expect(release.code).toBe(0);
    expect(release.stderr).toMatch(
      /release of key .* on POST \/slow by "oncall": released while its lock was live/,
    );

    const secondRuns = await runs(second);
    const retried = post(second, '/slow', key, { amount: 7 });
    await until(async () => (await runs(second)) > secondRuns);
    await fetch(`${first.baseUrl}/slow/finish`, { method: 'POST' });
    expect((await stuck).status).toBe(201);
    await first.waitForOutput(
      /WARN Key .* on POST \/slow was taken over .*its response was not stored/,
    );
    await fetch(`${second.baseUrl}/slow/finish`, { method: 'POST' });
    const retriedResponse = await retried;
    const retriedBody = await retriedResponse.json();
    expect(retriedResponse.status).toBe(201);
    expect(retriedResponse.headers.get('idempotent-replayed')).toBeNull();

    const replay = await post(third, '/slow', key, { amount: 7 });
    expect(replay.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.json()).toEqual(retriedBody);
  }, 60_000);
});
