import autocannon from 'autocannon';
import { ORDER_BODY } from './bench-config.js';

/** Which Idempotency-Key each request carries. */
export type KeyPlan =
  /** No header: the `plain` route. */
  | { readonly kind: 'none' }
  /** A key never seen before on every request: the `first` route. */
  | { readonly kind: 'fresh'; readonly prefix: string }
  /** Keys that already completed, round-robin: the `replay` route. */
  | { readonly kind: 'cycle'; readonly keys: readonly string[] };

export interface LoadOptions {
  readonly port: number;
  readonly path: string;
  readonly keys: KeyPlan;
  readonly connections: number;
  /** Run for this long, or until `amount` requests, whichever the caller sets. */
  readonly durationS?: number;
  readonly amount?: number;
  /** Called once the load runs, with a function that stops it early (used by the purge phase). */
  readonly onStart?: (stop: () => void) => void;
}

export interface LoadResult {
  readonly rps: number;
  readonly p50_ms: number;
  readonly p99_ms: number;
  readonly requests: number;
  readonly non2xx: number;
  readonly errors: number;
  readonly durationS: number;
}

/**
 * One autocannon run against 127.0.0.1. Keys are set per request in `setupRequest`, which
 * autocannon calls before each request it sends, so no two `first` requests share a key.
 */
export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const headers = { 'content-type': 'application/json' };
  const setupRequest = keySetter(options.keys);
  let instance!: autocannon.Instance;
  // With a callback autocannon returns its instance (which can be stopped), not a promise.
  const done = new Promise<autocannon.Result>((resolve, reject) => {
    instance = autocannon(
      {
        url: `http://127.0.0.1:${options.port}`,
        connections: options.connections,
        pipelining: 1,
        ...(options.amount ? { amount: options.amount } : { duration: options.durationS ?? 5 }),
        requests: [
          {
            method: 'POST',
            path: options.path,
            headers,
            body: ORDER_BODY,
            ...(setupRequest ? { setupRequest } : {}),
          },
        ],
      },
      (error: Error | null, result) => (error ? reject(error) : resolve(result)),
    );
  });
  options.onStart?.(() => instance.stop());
  const result = await done;
  return {
    rps: result.duration > 0 ? result.requests.total / result.duration : 0,
    p50_ms: result.latency.p50,
    p99_ms: result.latency.p99,
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    durationS: result.duration,
  };
}

function keySetter(
  plan: KeyPlan,
): ((request: autocannon.Request) => autocannon.Request) | undefined {
  switch (plan.kind) {
    case 'none':
      return undefined;
    case 'fresh': {
      let next = 0;
      return (request) => withKey(request, `${plan.prefix}-${next++}`);
    }
    case 'cycle': {
      let next = 0;
      return (request) => withKey(request, plan.keys[next++ % plan.keys.length]);
    }
  }
}

function withKey(request: autocannon.Request, key: string): autocannon.Request {
  return { ...request, headers: { ...request.headers, 'idempotency-key': key } };
}

/** Sends one request and returns its status and replay header (for seeding and sanity checks). */
export async function postOnce(port: number, path: string, key: string | undefined) {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key ? { 'idempotency-key': key } : {}) },
    body: ORDER_BODY,
  });
  await response.arrayBuffer();
  return {
    status: response.status,
    replayed: response.headers.get('idempotent-replayed') === 'true',
  };
}

/**
 * Completes `keys` through the app, `parallel` at a time, so the `replay` route finds them done.
 * Throws if any is refused: a replay run on keys that never completed would measure nothing.
 */
export async function seedKeys(port: number, path: string, keys: readonly string[], parallel = 16) {
  let index = 0;
  const worker = async () => {
    while (index < keys.length) {
      const key = keys[index++];
      const { status } = await postOnce(port, path, key);
      if (status !== 201) throw new Error(`seeding key ${key} on ${path} answered ${status}`);
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
}
