import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

/**
 * The demo's crash: the shop process dies right after a transfer's money moved, before its
 * response is stored (SAMPLE_CRASH_AFTER_TRANSFER=1 makes it SIGKILL itself there). The client
 * retries the same transfer, with the same key, against the restarted shop. In the plain mode the
 * money had committed on its own, so the retry moves it again; in the transactional mode it had not
 * (the writes commit with the stored response), so the retry moves it once.
 */

export interface CrashOutcome {
  readonly mode: 'plain' | 'transactional';
  readonly attempts: number;
  readonly finalStatus: number;
  /** How many times the transfer's amount left Alice's account. */
  readonly moved: number;
}

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));
const AMOUNT = 100;
/** Short, so the retry can take over the dead process's claim within a second. */
const LOCK_TIMEOUT = '1s';

interface Shop {
  readonly url: string;
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
}

/** `node dist/sample/main.js` on a free port, with its PGlite folder in `dataDir`. */
async function startShop(dataDir: string, extraEnv: Record<string, string> = {}): Promise<Shop> {
  const child = spawn(process.execPath, [MAIN], {
    env: {
      ...process.env,
      DATABASE_URL: '',
      SAMPLE_DATA_DIR: dataDir,
      PORT: '0',
      IDEMPOTENCY_LOCK_TIMEOUT: LOCK_TIMEOUT,
      ...extraEnv,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let output = '';
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      const match = /Listening on http:\/\/localhost:(\d+)/.exec(output);
      if (match) resolve(`http://127.0.0.1:${match[1]}`);
    });
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    void exited.then(() => reject(new Error(`The sample exited before listening:\n${output}`)));
  });
  return { url, child, exited };
}

async function stopShop(shop: Shop): Promise<void> {
  if (shop.child.exitCode === null && shop.child.signalCode === null) shop.child.kill('SIGTERM');
  await shop.exited;
}

async function aliceBalance(url: string): Promise<number> {
  const response = await fetch(`${url}/accounts/acc_alice`);
  return Number(((await response.json()) as { balance: number }).balance);
}

export async function runCrashScenario(mode: CrashOutcome['mode']): Promise<CrashOutcome> {
  const path = mode === 'transactional' ? '/transfers' : '/transfers/plain-mode';
  const dataDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-demo-'));
  const key = randomUUID();
  const send = (url: string) =>
    fetch(url + path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      body: JSON.stringify({ from_account: 'acc_alice', to_account: 'acc_bob', amount: AMOUNT }),
    });
  try {
    console.log(`${mode} mode — POST ${path}`);
    const doomed = await startShop(dataDir, { SAMPLE_CRASH_AFTER_TRANSFER: '1' });
    const before = await aliceBalance(doomed.url);
    const lost = await send(doomed.url).then(
      (response) => `${response.status}`,
      () => 'no response (the process died)',
    );
    await doomed.exited;
    console.log(`  attempt 1: ${lost}`);

    const shop = await startShop(dataDir);
    try {
      for (let attempt = 2; ; attempt++) {
        const response = await send(shop.url);
        const replayed = response.headers.get('Idempotent-Replayed') === 'true';
        console.log(`  attempt ${attempt}: ${response.status}${replayed ? ' (replayed)' : ''}`);
        if (response.status !== 409 || attempt > 50) {
          const moved = (before - (await aliceBalance(shop.url))) / AMOUNT;
          console.log(
            `  the transfer moved the money ${moved === 1 ? 'once' : `${moved} times`}\n`,
          );
          return { mode, attempts: attempt, finalStatus: response.status, moved };
        }
        // The dead process's claim: taken over once lockTimeout has passed since its last renewal.
        await sleep(Number(response.headers.get('Retry-After') ?? 1) * 250);
      }
    } finally {
      await stopShop(shop);
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(`${dataDir}.lock`, { force: true });
  }
}
