import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { waitUntilPast } from './fixtures/fixture-app.js';
import { createEffectsTables, dropEffectsTables } from './support/effects.js';
import { HttpClient, isReplay, jsonOf, type Exchange } from './support/http-client.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { describeOnPostgres, report, runTag, tally, waitFor } from './support/reliability.js';

/** The /crash routes' lockTimeout: how long a dead process's claim blocks its key. */
const LOCK_TIMEOUT = '2s';
const KEYS = 3;
const RETRIES_PER_KEY_AFTER_DEADLINE = 8;

interface RecordRow {
  idempotency_key: string;
  state: string;
  expires_at: string;
  response_body: string | null;
}

describeOnPostgres('a process killed while its handler runs', (url) => {
  const tag = runTag('crash');
  let db: DataSource;
  let survivors: AppProcess[] = [];
  let clients: HttpClient[] = [];
  /** One per test: processes whose /crash handlers hang, to be killed mid-request. */
  let victims: AppProcess[] = [];

  const recordsOf = (keys: string[]): Promise<RecordRow[]> =>
    db.query(
      'SELECT idempotency_key, state, expires_at, response_body FROM idempotency_records WHERE scope = $1 AND idempotency_key = ANY($2)',
      [tag, keys],
    );
  const effectsOf = async (table: string, keys: string[]) => {
    const rows: { idempotency_key: string; id: number; pid: number }[] = await db.query(
      `SELECT idempotency_key, id, pid FROM ${table} WHERE idempotency_key = ANY($1) ORDER BY id`,
      [keys],
    );
    return (key: string) => rows.filter((row) => row.idempotency_key === key);
  };

  /**
   * Sends each key to a victim that claims it and hangs, waits until every handler is running and
   * every record is in progress, then SIGKILLs the victim. Returns the locks' deadlines.
   */
  async function claimAndKill(route: string, keys: string[], victim: AppProcess) {
    const victimClient = new HttpClient(victim.baseUrl, keys.length);
    const inFlight = keys.map((key) =>
      victimClient.post(route, key, { amount: 7 }, { 'X-Tenant': tag }),
    );
    for (const key of keys)
      await victim.waitForOutput(new RegExp(`entered ${route.slice(1)} ${key}`));
    const claimed = await waitFor('the records to be in progress', async () => {
      const rows = await recordsOf(keys);
      return rows.length === keys.length && rows.every((r) => r.state === 'in_progress')
        ? rows
        : undefined;
    });
    await victim.stop('SIGKILL');
    // The victim's clients get no response: the connection dies with the process.
    const lost = Promise.all(inFlight).then((exchanges) => {
      victimClient.close();
      return exchanges.map((exchange) => exchange.status);
    });
    return {
      lost,
      killedAt: Date.now(),
      victimPid: victim.child.pid!,
      deadline: Math.max(...claimed.map((row) => Number(row.expires_at))),
      firstDeadline: Math.min(...claimed.map((row) => Number(row.expires_at))),
    };
  }

  /** Retries every key at the survivors until the first lock's deadline: returns what came back in time. */
  async function retriesBeforeDeadline(route: string, keys: string[], firstDeadline: number) {
    const answered: Exchange[] = [];
    let round = 0;
    while (Date.now() < firstDeadline - 100) {
      const exchanges = await Promise.all(
        keys.map((key, i) =>
          clients[(i + round) % clients.length].post(
            route,
            key,
            { amount: 7 },
            { 'X-Tenant': tag },
          ),
        ),
      );
      round++;
      // Only an answer that arrived before the deadline must be a 409; later ones may take over.
      if (Date.now() < firstDeadline) answered.push(...exchanges);
      else break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return answered;
  }

  /** After the deadline: several concurrent retries per key, spread over the survivors. */
  function burst(route: string, keys: string[]) {
    return Promise.all(
      keys.flatMap((key) =>
        Array.from({ length: RETRIES_PER_KEY_AFTER_DEADLINE }, (_, i) =>
          clients[i % clients.length]
            .post(route, key, { amount: 7 }, { 'X-Tenant': tag })
            .then((exchange) => ({ key, exchange })),
        ),
      ),
    );
  }

  beforeAll(async () => {
    db = new DataSource({ type: 'postgres', url });
    await db.initialize();
    await createEffectsTables(db, tag);
    const started = await Promise.all(
      (['0', '0', '1', '1'] as const).map((hang) =>
        startAppProcess('test/fixtures/storm-server.js', {
          DATABASE_URL: url,
          EFFECTS_TABLE: tag,
          CRASH_LOCK_TIMEOUT: LOCK_TIMEOUT,
          HANG: hang,
        }),
      ),
    );
    survivors = started.slice(0, 2);
    victims = started.slice(2);
    clients = survivors.map((p) => new HttpClient(p.baseUrl, 32));
  }, 60_000);

  afterAll(async () => {
    clients.forEach((client) => client.close());
    await Promise.all([...survivors, ...victims].map((p) => p.stop('SIGKILL')));
    if (db?.isInitialized) {
      await dropEffectsTables(db, tag);
      await db.query('DELETE FROM idempotency_records WHERE scope = $1', [tag]);
      await db.destroy();
    }
  });

  it('answers 409 until the lock times out, then exactly one retry takes over and runs the handler once', async () => {
    const keys = Array.from({ length: KEYS }, () => randomUUID());
    const { firstDeadline, deadline, killedAt, lost } = await claimAndKill(
      '/crash',
      keys,
      victims[0],
    );

    const early = await retriesBeforeDeadline('/crash', keys, firstDeadline);
    expect(await lost).toEqual(keys.map(() => 0));
    expect(early.length).toBeGreaterThanOrEqual(keys.length);
    for (const exchange of early) {
      expect(exchange.status).toBe(409);
      expect(Number(exchange.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    }
    expect((await effectsOf(tag, keys))(keys[0])).toHaveLength(0);

    await waitUntilPast(deadline);
    const after = await burst('/crash', keys);
    const effects = await effectsOf(tag, keys);
    const records = await recordsOf(keys);
    const survivorPids = survivors.map((p) => p.child.pid);
    for (const key of keys) {
      const ofKey = after.filter((a) => a.key === key).map((a) => a.exchange);
      const takeovers = ofKey.filter((e) => e.status === 201 && !isReplay(e));
      expect(takeovers).toHaveLength(1);
      const original = jsonOf(takeovers[0]);
      for (const exchange of ofKey) {
        if (exchange.status === 409) continue;
        expect(exchange.status).toBe(201);
        expect(jsonOf(exchange)).toEqual(original);
      }
      // One side effect, written by the survivor that took over; the killed handler wrote none.
      expect(effects(key)).toHaveLength(1);
      expect(effects(key)[0].id).toBe(original.effect);
      expect(survivorPids).toContain(effects(key)[0].pid);
      const record = records.find((r) => r.idempotency_key === key)!;
      expect(record.state).toBe('completed');
      expect(JSON.parse(record.response_body!)).toEqual(original);
      const later = await clients[1].post('/crash', key, { amount: 7 }, { 'X-Tenant': tag });
      expect(isReplay(later)).toBe(true);
      expect(jsonOf(later)).toEqual(original);
    }
    report('crash: SIGKILL with keys claimed, lockTimeout ' + LOCK_TIMEOUT, {
      'keys claimed by the killed process': keys.length,
      'lock time left when the process was killed': `${firstDeadline - killedAt} ms`,
      'retries before the lock deadline': `${early.length}, all 409`,
      [`concurrent retries after the deadline (${RETRIES_PER_KEY_AFTER_DEADLINE} per key, 2 processes)`]:
        JSON.stringify(
          tally(
            after.map((a) =>
              a.exchange.status === 201 && !isReplay(a.exchange)
                ? 'takeover'
                : isReplay(a.exchange)
                  ? 'replay'
                  : a.exchange.status,
            ),
          ),
        ),
      'side effects per key': keys.map((key) => effects(key).length).join(', '),
    });
  }, 60_000);

  it('a handler killed after committing its side effect runs again on takeover; an idempotent write keeps one effect', async () => {
    const keys = Array.from({ length: KEYS }, () => randomUUID());
    const { victimPid, deadline, lost } = await claimAndKill(
      '/crash-after-effect',
      keys,
      victims[1],
    );
    expect(await lost).toEqual(keys.map(() => 0));
    await waitUntilPast(deadline);
    const after = await burst('/crash-after-effect', keys);
    const attempts = await effectsOf(tag, keys);
    const effects = await effectsOf(`${tag}_unique`, keys);
    for (const key of keys) {
      const ofKey = after.filter((a) => a.key === key).map((a) => a.exchange);
      const takeovers = ofKey.filter((e) => e.status === 201 && !isReplay(e));
      expect(takeovers).toHaveLength(1);
      expect(ofKey.every((e) => e.status === 409 || e.status === 201)).toBe(true);
      // The README's one window: the handler ran twice (the victim's run, then the takeover)...
      expect(attempts(key)).toHaveLength(2);
      // ...and the handler's own unique constraint kept the effect single: the victim's.
      expect(effects(key)).toHaveLength(1);
      expect(effects(key)[0].pid).toBe(victimPid);
      expect(jsonOf(takeovers[0])).toMatchObject({
        effect: effects(key)[0].id,
        firstPid: victimPid,
      });
    }
    report('crash after the side effect committed (the documented window)', {
      keys: keys.length,
      'handler runs per key': keys.map((key) => attempts(key).length).join(', '),
      'effects per key with a unique constraint on the key': keys
        .map((key) => effects(key).length)
        .join(', '),
    });
  }, 60_000);
});
