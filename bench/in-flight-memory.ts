import { request, Agent } from 'node:http';
import { ORDER_BODY } from './bench-config.js';
import type { ChildApp } from './child-process.js';
import { round } from './stats.js';

/** What one app holds per request in flight, heap after a forced GC (bytes → KiB). */
export interface InFlightMemory {
  /** Requests held at once. */
  readonly requests: number;
  /** Per request of `hold/plain` in flight (no `@Idempotent()`): Nest, Express, the socket. */
  readonly plain_kib_per_request: number;
  /** Per request of `hold` in flight (`@Idempotent()`, fresh key): its lease runs meanwhile. */
  readonly idempotent_kib_per_request: number;
  /** The difference: what the library holds per running lease. */
  readonly kib_per_lease: number;
}

interface Memory {
  heapUsed: number;
  external: number;
}

/**
 * Holds `count` requests of the app's `hold` routes in flight at once (their handler parked), reads
 * the app's heap (after a forced GC) against the same with none in flight, releases them and waits
 * for their answers: once without `@Idempotent()`, once with (each a running lease). Heap only:
 * RSS moves by whole pages and keeps what the allocator once took.
 */
export async function measureInFlightMemory(app: ChildApp, count = 500): Promise<InFlightMemory> {
  const agent = new Agent({ keepAlive: false, maxSockets: Infinity });
  const held = async (path: string, keyed: boolean) => {
    const idle = await app.command<Memory>('memory');
    const tag = `inflight-${Date.now()}`;
    const answers = Array.from({ length: count }, (_, i) =>
      post(agent, app.port, path, keyed ? `${tag}-${i}` : undefined),
    );
    const deadline = Date.now() + 30_000;
    while ((await app.command<number>('held')) < count) {
      if (Date.now() > deadline) throw new Error(`in-flight memory: ${path} never held ${count}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const busy = await app.command<Memory>('memory');
    await app.command('release-held');
    const statuses = await Promise.all(answers);
    const failed = statuses.filter((status) => status !== 201).length;
    if (failed > 0) throw new Error(`in-flight memory: ${failed} of ${count} on ${path} failed`);
    return (busy.heapUsed + busy.external - idle.heapUsed - idle.external) / count / 1024;
  };
  try {
    // Once each before measuring: code compiled, pools and caches warm.
    await held('/hold/plain', false);
    await held('/hold', true);
    const plain = await held('/hold/plain', false);
    const idempotent = await held('/hold', true);
    return {
      requests: count,
      plain_kib_per_request: round(plain, 1),
      idempotent_kib_per_request: round(idempotent, 1),
      kib_per_lease: round(idempotent - plain, 1),
    };
  } finally {
    agent.destroy();
  }
}

function post(agent: Agent, port: number, path: string, key: string | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        agent,
        host: '127.0.0.1',
        port,
        path,
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(ORDER_BODY),
          ...(key ? { 'idempotency-key': key } : {}),
        },
      },
      (response) => {
        response.resume();
        response.on('end', () => resolve(response.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    req.end(ORDER_BODY);
  });
}
