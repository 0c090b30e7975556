import { randomInt, randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { createEffectsTables, dropEffectsTables } from './effects.js';
import { HttpClient, type Exchange } from './http-client.js';
import { startAppProcess, type AppProcess } from './processes.js';
import { inParallel } from './reliability.js';

/** The storm server's idempotent routes: 'effects' answers duplicates 409, 'effects-wait' waits. */
export type StormRoute = 'effects' | 'effects-wait';

/** One request of a storm: a copy of `key`, for process number `process`. */
export interface StormRequest {
  readonly key: string;
  readonly route: StormRoute;
  readonly process: number;
  readonly amount: number;
}

export interface SentRequest extends StormRequest {
  readonly exchange: Exchange;
}

export interface StormPlanOptions {
  readonly requests: number;
  readonly processes: number;
  /** Copies per key, cycled: key i gets `copies[i % copies.length]` copies. */
  readonly copies: readonly number[];
  readonly routeOf: (keyIndex: number) => StormRoute;
  /** Keys to use first, in order (e.g. keys the test seeded rows for); then random UUIDs. */
  readonly keys?: readonly string[];
}

/**
 * Plans a storm: each key gets its copies spread over the processes from a random one on; every
 * process's queue follows key order, so the copies of a key are in flight at the same time.
 */
export function planStorm(options: StormPlanOptions): { plan: StormRequest[]; keys: string[] } {
  const plan: StormRequest[] = [];
  const keys: string[] = [];
  while (plan.length < options.requests) {
    const key = options.keys?.[keys.length] ?? randomUUID();
    const route = options.routeOf(keys.length);
    const copies = Math.min(
      options.copies[keys.length % options.copies.length],
      options.requests - plan.length,
    );
    const first = randomInt(options.processes);
    for (let copy = 0; copy < copies; copy++) {
      plan.push({ key, route, process: (first + copy) % options.processes, amount: keys.length });
    }
    keys.push(key);
  }
  return { plan, keys };
}

/** The body every storm request of key number `amount` carries (its copies and retries alike). */
export const stormBody = (amount: number) => ({ amount, note: 'storm' });

/**
 * Sends the plan, `inFlight` requests at a time per process, each in the caller scope `tenant`;
 * resolves with every exchange, in plan order per process.
 */
export async function fireStorm(
  clients: readonly HttpClient[],
  plan: readonly StormRequest[],
  {
    inFlight,
    tenant,
    deadlineMs = 120_000,
  }: { inFlight: number; tenant: string; deadlineMs?: number },
): Promise<SentRequest[]> {
  const perProcess = await Promise.all(
    clients.map((client, index) =>
      inParallel(
        inFlight,
        plan
          .filter((item) => item.process === index)
          .map((item) => async (): Promise<SentRequest> => ({
            ...item,
            exchange: await client.post(
              `/${item.route}`,
              item.key,
              stormBody(item.amount),
              { 'X-Tenant': tenant },
              deadlineMs,
            ),
          })),
      ),
    ),
  );
  return perProcess.flat();
}

/**
 * A PostgreSQL schema of the test's own: the returned URL sets `search_path` to it, so the storm
 * processes' `idempotency_records` (created by their startup migration) and the effects tables live
 * there. A purge in it cannot touch another spec's rows, and its row count is this test's alone.
 */
export async function createIsolatedSchema(
  db: { query(sql: string): Promise<unknown> },
  url: string,
  schema: string,
): Promise<{ url: string; drop(): Promise<void> }> {
  await db.query(`CREATE SCHEMA ${schema}`);
  const parsed = new URL(url);
  parsed.searchParams.set('options', `-c search_path=${schema}`);
  return {
    url: parsed.toString(),
    drop: async () => void (await db.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)),
  };
}

/** Sums the storm processes' module counters (GET /metrics). */
export async function metricsOf(clients: readonly HttpClient[]): Promise<Record<string, number>> {
  const total: Record<string, number> = {};
  for (const client of clients) {
    const exchange = await client.send('/metrics', { method: 'GET' });
    if (exchange.status !== 200)
      throw new Error(`GET /metrics: ${exchange.status} ${exchange.text}`);
    for (const [event, count] of Object.entries(
      JSON.parse(exchange.text) as Record<string, number>,
    )) {
      total[event] = (total[event] ?? 0) + count;
    }
  }
  return total;
}

/**
 * The start of a multi-process run against one tenant (`tag`) on PostgreSQL at `url`: the run's
 * connection, its effects tables, and `count` storm-server processes recording into them, each
 * with `env` (the server's settings) on top of the database and the table.
 */
export async function startRun(run: {
  url: string;
  tag: string;
  count: number;
  env: Record<string, string>;
}): Promise<{ db: DataSource; processes: AppProcess[] }> {
  const db = await new DataSource({ type: 'postgres', url: run.url }).initialize();
  await createEffectsTables(db, run.tag);
  const processes = await Promise.all(
    Array.from({ length: run.count }, () =>
      startAppProcess('test/fixtures/storm-server.js', {
        DATABASE_URL: run.url,
        EFFECTS_TABLE: run.tag,
        ...run.env,
      }),
    ),
  );
  return { db, processes };
}

/**
 * The end of a multi-process run against one tenant (`tag`): closes the clients, stops the
 * processes, drops the effects tables and deletes the tenant's records.
 */
export async function tearDownRun(run: {
  clients: readonly HttpClient[];
  processes: readonly AppProcess[];
  db: DataSource | undefined;
  tag: string;
}): Promise<void> {
  run.clients.forEach((client) => client.close());
  await Promise.all(run.processes.map((p) => p.stop()));
  if (run.db?.isInitialized) {
    await dropEffectsTables(run.db, run.tag);
    await run.db.query('DELETE FROM idempotency_records WHERE scope = $1', [run.tag]);
    await run.db.destroy();
  }
}
