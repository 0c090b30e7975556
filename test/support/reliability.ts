import { randomUUID } from 'node:crypto';
import type { DataSource } from 'typeorm';
import { IdempotencyRecord } from '../../lib/index.js';
import { testDatabases, type TestDatabase } from './databases.js';

/**
 * The reliability suite's knobs. `npm test` runs every scenario at its default size; `SOAK=1`
 * multiplies the sizes by ten (storms, purge soak) for a longer run.
 */
export const SOAK = process.env.SOAK === '1';
export const soakFactor = SOAK ? 10 : 1;

/** PostgreSQL when DATABASE_URL is set: the only database several processes (or a proxy) can share. */
export const sharedDatabase: TestDatabase | undefined = testDatabases.find((d) => d.shared);

/**
 * `describe` on PostgreSQL only; without DATABASE_URL a clearly named skipped suite, as
 * multi-process.spec.ts does.
 */
export const describeOnPostgres: (name: string, body: (url: string) => void) => void = (
  name,
  body,
) => {
  if (sharedDatabase) {
    const { url } = sharedDatabase.options() as { url: string };
    describe(`${name} on postgres`, () => body(url));
  } else {
    describe.skip(`${name} (no shared database: set DATABASE_URL)`, () => {
      it('needs PostgreSQL', () => undefined);
    });
  }
};

/** A tag unique to this test run: table names and scopes, so runs sharing a database never mix. */
export function runTag(prefix: string): string {
  return `${prefix}_${randomUUID().replace(/-/g, '').slice(0, 12)}`;
}

/**
 * Prints a block of figures under a title, one `name: value` per line, so the output can be quoted
 * as it is (README "Reliability").
 */
export function report(title: string, figures: Record<string, string | number>): void {
  const width = Math.max(...Object.keys(figures).map((name) => name.length));
  const lines = Object.entries(figures).map(([name, value]) => `  ${name.padEnd(width)}  ${value}`);
  console.log(`[reliability] ${title}${SOAK ? ' (SOAK=1)' : ''}\n${lines.join('\n')}`);
}

/** Counts of values, e.g. statuses: `{ '201': 10, '409': 3 }`. */
export function tally<T extends string | number>(values: Iterable<T>): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const value of values) counts[String(value)] = (counts[String(value)] ?? 0) + 1;
  return counts;
}

/**
 * Polls `probe` until it returns a value other than undefined, or throws once `timeoutMs` has
 * passed: waiting for a known condition with a deadline, not sleeping and hoping.
 */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined> | T | undefined,
  { timeoutMs = 10_000, intervalMs = 20 } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline)
      throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Runs `tasks` with at most `limit` in flight; results in task order. */
export async function inParallel<T>(
  limit: number,
  tasks: readonly (() => Promise<T>)[],
): Promise<T[]> {
  const results = new Array<T>(tasks.length);
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) {
      const index = next++;
      results[index] = await tasks[index]();
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  return results;
}

/** A stack trace in a response body: `at fn (file.js:12:3)`. */
export const STACK_TRACE = /\bat .*\(?[^\s()]+\.(?:js|ts|mjs|cjs):\d+(?::\d+)?\)?/;

/** `p50 12 ms, p99 80 ms, max 95 ms` for a list of durations. */
export function latencySummary(durationsMs: readonly number[]): string {
  if (durationsMs.length === 0) return 'n/a';
  const sorted = [...durationsMs].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  const ms = (value: number) => `${Math.round(value)} ms`;
  return `p50 ${ms(at(0.5))}, p99 ${ms(at(0.99))}, max ${ms(sorted[sorted.length - 1])}`;
}

/**
 * Deletes the records of every scope `${tag}:…` a spec used: the table may be shared with other
 * spec files, so a spec removes only its own rows. Query builder: parameter syntax differs by database.
 */
export async function deleteRecordsOfRun(dataSource: DataSource, tag: string): Promise<void> {
  await dataSource
    .getRepository(IdempotencyRecord)
    .createQueryBuilder()
    .delete()
    .where('scope LIKE :prefix', { prefix: `${tag}:%` })
    .execute();
}
