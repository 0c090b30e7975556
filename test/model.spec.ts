/**
 * Model-based suite: random sequences of requests, duplicates in flight, handler outcomes of every
 * kind, crashes, clock jumps, rows deleted by hand and purges, run against the real module on every
 * transport × store and compared after every step with a small reference model of a key's life
 * (test/model/reference-model.ts; the commands are in test/model/model-commands.ts).
 *
 * - Transports: HTTP on Express and on Fastify, GraphQL (Apollo, code first, on Express), RPC
 *   (the TCP microservice, in process). Stores: PGlite, SQLite, PostgreSQL (DATABASE_URL),
 *   MariaDB (MARIADB_URL), each SQL server in a database of its own, and Redis (REDIS_URL);
 *   those whose URL is unset are skipped.
 * - One app per transport × store, reused by every sequence; each sequence has keys of its own.
 * - Three operations per app: `main` (renewed lease, replayStatus 200), `crashy`
 *   (`lockRenewalLimit: 0`) and `waiting` (`concurrency: 'wait'`). A handler can be held until a
 *   later step finishes it with an outcome, so what is in flight is always known.
 * - The clock is frozen (only `Date`, see support/clock.ts) and moved by the sequences. A crash is
 *   a handler held on `crashy` (nothing renews its claim) while the clock passes its lockTimeout,
 *   then a retry. Handlers held on `main` renew: after each jump the test waits until the renewal
 *   has reached the store.
 * - Compared: every answer (status, body, `Idempotent-Replayed`, the handler's and a middleware's
 *   headers; GraphQL data and `extensions.code`; RPC reply or error, and how the message was
 *   settled through `acknowledge`), the handler runs per record, and each record's row (state,
 *   expires_at, response status).
 *
 * Run more:     MODEL_RUNS=200 NODE_OPTIONS=--experimental-vm-modules npx jest test/model.spec.ts
 * Replay:       a failure prints the minimal sequence, what each step predicted, and the line that
 *               replays it, e.g.
 *               MODEL_SEED=-1234 MODEL_PATH="3:1:0" MODEL_REPLAY_PATH="Cd" \
 *               NODE_OPTIONS=--experimental-vm-modules npx jest test/model.spec.ts -t 'model: graphql on pglite'
 *               (MODEL_SEED alone generates the same sequences again; MODEL_PATH and
 *               MODEL_REPLAY_PATH go straight to the shrunk one.)
 * More steps:   MODEL_COMMANDS=25 (default: up to 15 per sequence).
 * Known broken: MODEL_INCLUDE_BROKEN=graphqlDateReplay,numericScope (or `all`) generates them anyway.
 * Logs:         MODEL_LOG=1 shows the app's logs.
 */
import { jest } from '@jest/globals';
import fc from 'fast-check';
import { randomBytes } from 'node:crypto';
import { freezeClockAt, setClock } from './support/clock.js';
import {
  commandsOf,
  drain,
  RealSystem,
  type KnownBroken,
  type ModelTarget,
} from './model/model-commands.js';
import {
  createModelApp,
  LOCK_TIMEOUT_MS,
  TTL_MS,
  type ModelApp,
  type TransportName,
} from './model/model-app.js';
import { isStored } from './model/model-renderings.js';
import { modelStores, type ModelStore } from './model/model-stores.js';
import { ReferenceModel } from './model/reference-model.js';

/**
 * Known defects: `true` leaves the feature out of the generated sequences (or, for #8, out of the
 * comparison). The defects of issue 20 are fixed, so their switches are `false` and the suite covers
 * them on every transport × store; `true` marks one still open.
 */
const KNOWN_BROKEN: KnownBroken = withIncluded({
  graphqlDateReplay: false, // #1
  graphqlCodeOnlyError: false, // #2
  rpcExceptionWithoutStatus: false, // #3
  numericScope: false, // #6
  routeOptionsPerInheritedHandler: false, // #5
  replayOverwritesMiddlewareHeaders: false, // #8
  mariadbTrailingSpace: false, // #11
  lostClaimSettledDone: true, // found by this suite; kept and documented (README: Manual acknowledgement)
});

/** MODEL_INCLUDE_BROKEN=numericScope,graphqlDateReplay (or `all`) runs those anyway, to see them fail. */
function withIncluded(switches: KnownBroken): KnownBroken {
  const included = (process.env.MODEL_INCLUDE_BROKEN ?? '').split(',').filter(Boolean);
  return Object.fromEntries(
    Object.entries(switches).map(([name, off]) => [
      name,
      off && !included.includes(name) && !included.includes('all'),
    ]),
  ) as unknown as KnownBroken;
}

const TRANSPORTS: readonly TransportName[] = ['http-express', 'http-fastify', 'graphql', 'rpc-tcp'];

/** Sequences per transport × store, and commands per sequence. */
const RUNS = Number(process.env.MODEL_RUNS ?? 30);
const MAX_COMMANDS = Number(process.env.MODEL_COMMANDS ?? 15);
const SEED = process.env.MODEL_SEED === undefined ? undefined : Number(process.env.MODEL_SEED);
const PATH = process.env.MODEL_PATH;
const REPLAY_PATH = process.env.MODEL_REPLAY_PATH;

/** The real time while Date is frozen (performance is not faked). */
const realNow = () => Math.round(performance.timeOrigin + performance.now());
/**
 * The frozen clock runs a day ahead of the real one: Redis (which expires records a grace period
 * after their end, by its own clock) keeps this run's records for that long.
 */
const DAY_MS = 86_400_000;

const combinations = TRANSPORTS.flatMap((transport) =>
  modelStores.map((store) => [transport, store.name, store] as const),
);

describe.each(combinations)('model: %s on %s', (transport, _storeName, storeTarget) => {
  if (storeTarget.skipped) {
    it.skip(`(${storeTarget.skipped})`, () => undefined);
    return;
  }
  const target: ModelTarget = { transport, storeName: storeTarget.name, knownBroken: KNOWN_BROKEN };
  const tag = `m${randomBytes(4).toString('hex')}`;
  let store: ModelStore;
  let app: ModelApp;

  beforeAll(async () => {
    store = await storeTarget.open();
    app = await createModelApp(
      transport,
      {
        ...store.options,
        purgeInterval: false,
        ttl: TTL_MS,
        lockTimeout: LOCK_TIMEOUT_MS,
        waitPollInterval: 10,
      },
      { baseClassControllers: !KNOWN_BROKEN.routeOptionsPerInheritedHandler },
    );
  });
  afterAll(async () => {
    await app?.close();
    await store?.close(tag);
  });
  afterEach(() => jest.useRealTimers());

  it(`agrees with the reference model over ${RUNS} sequences of up to ${MAX_COMMANDS} steps`, async () => {
    const started = performance.now();
    freezeClockAt(realNow() + DAY_MS);
    let runs = 0;
    let steps = 0;
    const events = new Map<string, number>();
    const property = fc.asyncProperty(
      fc.commands(commandsOf(target), {
        maxCommands: MAX_COMMANDS,
        size: 'max',
        replayPath: REPLAY_PATH,
      }),
      async (commands) => {
        const run = ++runs;
        // Never behind the real clock by less than a day (the runs move it on).
        setClock(Math.max(Date.now(), realNow() + DAY_MS));
        const model = new ReferenceModel(Date.now(), isStored);
        const real = new RealSystem(target, app, store, `${tag}r${run}-`);
        try {
          await fc.asyncModelRun(() => ({ model, real }), commands);
          await drain(model, real);
          steps += real.history.length;
          for (const [event, count] of model.events)
            events.set(event, (events.get(event) ?? 0) + count);
        } catch (error) {
          (error as Error).message += `\n\nWhat the run did:\n  ${real.history.join('\n  ')}`;
          throw error;
        } finally {
          await real.cleanUp();
        }
      },
    );
    const details = await fc.check(property, { numRuns: RUNS, seed: SEED, path: PATH });
    if (details.failed) {
      // fast-check's command list has a toString of its own, which carries the replay path.
      // eslint-disable-next-line @typescript-eslint/no-base-to-string
      const replayPath = /replayPath="([^"]*)"/.exec(String(details.counterexample?.[0]))?.[1];
      // What else shapes the sequences must be set the same way to replay them.
      const shaping = ['MODEL_COMMANDS', 'MODEL_INCLUDE_BROKEN']
        .filter((name) => process.env[name])
        .map((name) => `${name}=${process.env[name]} `)
        .join('');
      throw new Error(
        `${fc.defaultReportMessage(details)}\n\n${String((details.errorInstance as Error | undefined)?.message ?? details.errorInstance)}\n\nReplay: ${shaping}MODEL_SEED=${details.seed} MODEL_PATH="${details.counterexamplePath}"` +
          `${replayPath ? ` MODEL_REPLAY_PATH="${replayPath}"` : ''} NODE_OPTIONS=--experimental-vm-modules ` +
          `npx jest test/model.spec.ts -t 'model: ${transport} on ${storeTarget.name}'`,
      );
    }
    console.log(
      `[model] ${transport} on ${storeTarget.name}: ${runs} sequences, ${steps} steps, ` +
        `${Math.round(performance.now() - started)} ms (seed ${details.seed})\n  ` +
        [...events].map(([event, count]) => `${event}: ${count}`).join(', '),
    );
  }, 300_000);
});
