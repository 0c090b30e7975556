import type { INestApplication } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { idempotentFetch } from '../lib/index.js';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { createSampleApp } from './app.factory.js';
import { runCrashScenario, type CrashOutcome } from './demo-crash.js';

/**
 * A client on a flaky network pays once, twice over, with the library's retrying client
 * (`idempotentFetch`: one Idempotency-Key for the payment, the same on every attempt): against the
 * route with `@Idempotent()`, and against the same handler without it. Each time, the first
 * responses are "lost" — the client gives up before the gateway answers, while the server carries
 * on and charges — and the client retries until it gets an answer. Then the demo counts the
 * charges each scenario really made.
 *
 * Then the shop itself crashes right after a transfer's money moved (see demo-crash.ts): in the
 * plain mode the retry moves the money again, in the transactional mode once.
 *
 * `npm run demo`. It boots the sample in-process on an in-memory database and a free port, and for
 * the crash, as processes of its own on a PGlite folder in the system's temp directory.
 */

const GATEWAY_LATENCY_MS = 300;
/** Attempts whose response never arrives; the one after them gets through. */
const LOST_ATTEMPTS = 3;
/** Well under the gateway latency: every lost attempt is given up while its charge is running. */
const FLAKY_TIMEOUT_MS = 75;
const PATIENT_TIMEOUT_MS = 10_000;
/** No new charge for this long means none is still in flight: it exceeds a whole gateway call. */
const QUIET_PERIOD_MS = GATEWAY_LATENCY_MS * 2;

interface Scenario {
  readonly name: string;
  /** `POST /payments` is `@Idempotent()`; `/payments/unprotected` is the same handler without it. */
  readonly path: string;
}

interface Outcome {
  readonly scenario: Scenario;
  readonly attempts: number;
  readonly lost: number;
  readonly charges: number;
  readonly finalResponse: string;
  readonly finalStatus: number;
}

const SCENARIOS: readonly Scenario[] = [
  { name: 'with @Idempotent()', path: '/payments' },
  { name: 'without @Idempotent()', path: '/payments/unprotected' },
];

async function main(): Promise<void> {
  const app = await createSampleApp({
    dataDir: 'memory://',
    gatewayLatencyMs: GATEWAY_LATENCY_MS,
    logger: ['error', 'warn'],
  });
  const outcomes: Outcome[] = [];
  try {
    const baseUrl = await listenOnFreePort(app);
    console.log(
      `Sample shop at ${baseUrl}; the gateway takes ${GATEWAY_LATENCY_MS} ms, the flaky client gives up after ${FLAKY_TIMEOUT_MS} ms.\n`,
    );
    for (const scenario of SCENARIOS) outcomes.push(await run(baseUrl, scenario));
  } finally {
    await app.close();
  }
  const crashes: CrashOutcome[] = [];
  for (const mode of ['plain', 'transactional'] as const)
    crashes.push(await runCrashScenario(mode));
  printTable(outcomes);
  printCrashTable(crashes);
  const protectedRoute = outcomes[0];
  if (protectedRoute.charges !== 1 || protectedRoute.finalStatus !== 201) {
    console.error(`\nUnexpected: with @Idempotent() there should be exactly one charge and a 201.`);
    process.exitCode = 1;
  }
  const transactional = crashes[1];
  if (transactional.moved !== 1 || transactional.finalStatus !== 201) {
    console.error(
      `\nUnexpected: in the transactional mode the money should move once, with a 201.`,
    );
    process.exitCode = 1;
  }
}

async function listenOnFreePort(app: INestApplication<Server>): Promise<string> {
  await app.listen(0, '127.0.0.1');
  const { port } = app.getHttpServer().address() as AddressInfo;
  return `http://127.0.0.1:${port}`;
}

/**
 * One logical payment: `idempotentFetch` sends the same body and key on every attempt; the first
 * attempts time out (their responses are "lost"), the next one waits long enough.
 */
async function run(baseUrl: string, scenario: Scenario): Promise<Outcome> {
  console.log(`${scenario.name} — POST ${scenario.path}`);
  // Tags this scenario's payments, so they can be told apart in GET /payments.
  const reference = `demo-${randomUUID()}`;
  let lost = 0;
  const response = await idempotentFetch(
    baseUrl + scenario.path,
    {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ amount: 1999, currency: 'eur', source: 'tok_visa', reference }),
    },
    {
      maxAttempts: LOST_ATTEMPTS + 1,
      baseDelayMs: 50,
      attemptTimeoutMs: (attempt) =>
        attempt <= LOST_ATTEMPTS ? FLAKY_TIMEOUT_MS : PATIENT_TIMEOUT_MS,
      onRetry: ({ attempt, reason, delayMs }) => {
        if (reason === 'timeout') lost++;
        const what =
          reason === 'timeout'
            ? `no response within ${FLAKY_TIMEOUT_MS} ms (lost)`
            : String(reason);
        console.log(`  attempt ${attempt}: ${what} — retrying in ${delayMs} ms`);
      },
    },
  );
  const attempts = lost + 1;
  const payload = (await response.json()) as { id?: string };
  const replayed = response.headers.get('Idempotent-Replayed') === 'true';
  const finalResponse = `${response.status}${replayed ? ' (replayed)' : ''}`;
  console.log(`  attempt ${attempts}: ${finalResponse} ${payload.id ?? JSON.stringify(payload)}`);
  const charges = await settledChargeCount(baseUrl, reference);
  console.log(`  charges made for this payment: ${charges}\n`);
  return { scenario, attempts, lost, charges, finalResponse, finalStatus: response.status };
}

/**
 * The lost attempts are still running on the server when the client has its answer. Counts this
 * scenario's payments once that count has stopped moving for longer than a gateway call.
 */
async function settledChargeCount(baseUrl: string, reference: string): Promise<number> {
  const deadline = Date.now() + 15_000;
  let count = await countPayments(baseUrl, reference);
  let unchangedSince = Date.now();
  while (Date.now() - unchangedSince < QUIET_PERIOD_MS) {
    if (Date.now() > deadline) throw new Error('The payment count never settled');
    await sleep(50);
    const latest = await countPayments(baseUrl, reference);
    if (latest !== count) {
      count = latest;
      unchangedSince = Date.now();
    }
  }
  return count;
}

async function countPayments(baseUrl: string, reference: string): Promise<number> {
  const response = await fetch(`${baseUrl}/payments`);
  const payments = (await response.json()) as Array<{ reference: string | null }>;
  return payments.filter((payment) => payment.reference === reference).length;
}

function printTable(outcomes: readonly Outcome[]): void {
  printRows([
    ['scenario', 'attempts', 'responses lost', 'charges created', 'final response'],
    ...outcomes.map((o) => [
      o.scenario.name,
      String(o.attempts),
      String(o.lost),
      String(o.charges),
      o.finalResponse,
    ]),
  ]);
  const [protectedRoute, unprotectedRoute] = outcomes;
  console.log(
    `\nOne payment, the same flaky network and the same retrying client: with @Idempotent() the customer is charged ${times(protectedRoute.charges)}, without it ${times(unprotectedRoute.charges)}.`,
  );
}

function printCrashTable(crashes: readonly CrashOutcome[]): void {
  console.log('');
  printRows([
    ['crash after the money moved', 'attempts', 'final response', 'money moved'],
    ...crashes.map((c) => [
      `${c.mode} mode`,
      String(c.attempts),
      String(c.finalStatus),
      times(c.moved),
    ]),
  ]);
  const [plain, transactional] = crashes;
  console.log(
    `\nThe shop died between moving the money and storing the response: in the plain mode the retry moved it ${times(plain.moved)}, in the transactional mode ${times(transactional.moved)}.`,
  );
}

function printRows(rows: string[][]): void {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  const line = (row: string[]) =>
    row
      .map((cell, i) => cell.padEnd(widths[i]))
      .join(' | ')
      .trimEnd();
  console.log(line(rows[0]));
  console.log(widths.map((width) => '-'.repeat(width)).join('-|-'));
  for (const row of rows.slice(1)) console.log(line(row));
}

function times(count: number): string {
  return count === 1 ? 'once' : `${count} times`;
}

await main();
