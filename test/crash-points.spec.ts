import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { createEffectsTables, dropEffectsTables } from './support/effects.js';
import { HttpClient, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { describeOnPostgres, report, runTag, soakFactor, waitFor } from './support/reliability.js';

/** The /points routes' lockTimeout: a killed process's claim blocks its key this long after its last renewal. */
const LOCK_TIMEOUT = '1s';
const POINTS = ['before-claim', 'before-writes', 'after-writes', 'after-commit'] as const;
const MODES = ['transactional', 'plain'] as const;
/** Keys per mode and point, and concurrent retries per key once the victim is dead. */
const KEYS_PER_CASE = 5 * soakFactor;
const RETRIES_PER_KEY = 4;

type Point = (typeof POINTS)[number];
type Mode = (typeof MODES)[number];

/**
 * Effects per key after the retries. The transactional mode commits the handler's write with its
 * stored response, so a crash anywhere leaves one effect. The plain mode commits the write first:
 * killed after it and before the completion, the takeover writes it again (the window it closes).
 */
const EXPECTED_EFFECTS: Record<Mode, Record<Point, number>> = {
  transactional: { 'before-claim': 1, 'before-writes': 1, 'after-writes': 1, 'after-commit': 1 },
  plain: { 'before-claim': 1, 'before-writes': 1, 'after-writes': 2, 'after-commit': 1 },
};

interface Case {
  readonly mode: Mode;
  readonly point: Point;
  readonly key: string;
}

describeOnPostgres('SIGKILL at each point of a request, transactional and plain', (url) => {
  const tag = runTag('points');
  let db: DataSource;
  let victim: AppProcess;
  let survivors: AppProcess[] = [];
  let clients: HttpClient[] = [];

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
    await createEffectsTables(db, tag);
    const env = { DATABASE_URL: url, EFFECTS_TABLE: tag, CRASH_LOCK_TIMEOUT: LOCK_TIMEOUT };
    [victim, ...survivors] = await Promise.all([
      // Every transactional request hung in its handler holds a pool connection (its transaction):
      // the victim's pool must outnumber them, or its other claims would wait for a connection.
      startAppProcess('test/fixtures/storm-server.js', {
        ...env,
        HANG: '1',
        POOL_MAX: String(2 * KEYS_PER_CASE * POINTS.length + 10),
      }),
      startAppProcess('test/fixtures/storm-server.js', { ...env, HANG: '0' }),
      startAppProcess('test/fixtures/storm-server.js', { ...env, HANG: '0' }),
    ]);
    clients = survivors.map((p) => new HttpClient(p.baseUrl, 32));
  }, 60_000);

  afterAll(async () => {
    clients.forEach((client) => client.close());
    await Promise.all([victim, ...survivors].filter(Boolean).map((p) => p.stop('SIGKILL')));
    if (db?.isInitialized) {
      await dropEffectsTables(db, tag);
      await db.query('DELETE FROM idempotency_records WHERE scope = $1', [tag]);
      await db.destroy();
    }
  });

  const send = (client: HttpClient, { mode, key }: Case, headers: Record<string, string> = {}) =>
    client.post(`/points/${mode}`, key, { amount: 5 }, { 'X-Tenant': tag, ...headers });

  /** Retries until the key stops answering 409 (its lock ran out and one retry took over, or it replays). */
  async function retryUntilSettled(item: Case, round: number): Promise<Exchange[]> {
    return waitFor(
      `${item.mode}/${item.point} to settle`,
      async () => {
        const answers = await Promise.all(
          Array.from({ length: RETRIES_PER_KEY }, (_, i) =>
            send(clients[(i + round) % clients.length], item),
          ),
        );
        return answers.some((a) => a.status === 409) ? undefined : answers;
      },
      { timeoutMs: 15_000, intervalMs: 100 },
    );
  }

  it('after retries, each key has the effects its mode promises and a replayable response', async () => {
    const cases: Case[] = MODES.flatMap((mode) =>
      POINTS.flatMap((point) =>
        Array.from({ length: KEYS_PER_CASE }, () => ({ mode, point, key: randomUUID() })),
      ),
    );
    const victimClient = new HttpClient(victim.baseUrl, cases.length);
    const lost = cases.map((item) => send(victimClient, item, { 'X-Hang-At': item.point }));
    const downstreamOfVictim = new Map<string, string>();
    for (const item of cases) {
      const [, detail] = await victim.waitForOutput(
        new RegExp(`reached ${item.point} ${item.key} ?(\\S*)`),
      );
      if (detail) downstreamOfVictim.set(item.key, detail);
    }
    await victim.stop('SIGKILL');
    expect((await Promise.all(lost)).map((exchange) => exchange.status)).toEqual(
      cases.map(() => 0),
    );
    victimClient.close();

    const answers = new Map<string, Exchange[]>();
    await Promise.all(
      cases.map(async (item, round) => answers.set(item.key, await retryUntilSettled(item, round))),
    );

    const effects: { idempotency_key: string; pid: number }[] = await db.query(
      `SELECT idempotency_key, pid FROM ${tag} WHERE idempotency_key = ANY($1)`,
      [cases.map((item) => item.key)],
    );
    const figures: Record<string, string> = {};
    for (const item of cases) {
      const ofKey = effects.filter((row) => row.idempotency_key === item.key);
      const settled = answers.get(item.key)!;
      const originals = settled.filter((a) => a.status === 201 && !isReplay(a));
      // At most one retry ran the handler; every 201 carries the same body.
      expect(originals.length).toBeLessThanOrEqual(1);
      expect(settled.every((a) => a.status === 201)).toBe(true);
      const body = jsonOf(settled[0]);
      for (const answer of settled) expect(jsonOf(answer)).toEqual(body);
      expect(ofKey).toHaveLength(EXPECTED_EFFECTS[item.mode][item.point]);
      // The stored response is the effect that counts, and it replays from any process.
      const later = await send(clients[1], item);
      expect(isReplay(later)).toBe(true);
      expect(jsonOf(later)).toEqual(body);
      // The downstream key of the operation is the one the killed process had derived.
      if (downstreamOfVictim.has(item.key))
        expect(body.downstream).toBe(downstreamOfVictim.get(item.key));
      const name = `${item.mode}, killed ${item.point}`;
      figures[name] = [figures[name], String(ofKey.length)].filter(Boolean).join(', ');
    }
    report(
      `SIGKILL at each point (${KEYS_PER_CASE} keys each, 3 processes, lockTimeout ${LOCK_TIMEOUT}): effects per key after retries`,
      figures,
    );
  }, 90_000);
});
