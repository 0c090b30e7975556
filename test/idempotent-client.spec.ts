import { HttpModule, HttpService } from '@nestjs/axios';
import { Test } from '@nestjs/testing';
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import {
  idempotentAxios,
  idempotentFetch,
  type IdempotentRetryOptions,
  type RetryEvent,
} from '../lib/index.js';
import { createFixtureApp, waitUntilPast, type FixtureApp } from './fixtures/fixture-app.js';
import { eachDatabase } from './support/databases.js';

/**
 * The outgoing client against real servers: a scripted HTTP server that fails in each way a
 * network and a server can (a dropped connection, no answer, 503, 409 with Retry-After, …), and
 * an app running `@Idempotent()` itself.
 */

/** What the scripted server does with one request. */
type Step =
  | 'drop'
  | 'hang'
  | {
      status: number;
      headers?: Record<string, string>;
      body?: unknown;
      /** Sends the status and headers at once, the body only on `releaseBodies()`. */
      holdBody?: boolean;
    };

class ScriptedServer {
  readonly keys: (string | undefined)[] = [];
  private steps: Step[] = [];
  private readonly server: Server;
  private readonly hanging: ServerResponse[] = [];
  private readonly heldBodies: (() => void)[] = [];
  private arrivals: (() => void)[] = [];
  url = '';

  constructor() {
    this.server = createServer((request, response) => this.answer(request, response));
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  /** The next requests' fates, in order; the last one repeats. */
  script(...steps: Step[]): void {
    this.steps = steps;
    this.keys.length = 0;
  }

  /** Resolves once the next request has arrived (its body read). */
  nextRequest(): Promise<void> {
    return new Promise((resolve) => this.arrivals.push(resolve));
  }

  /** Sends the bodies of the answers sent with `holdBody`. */
  releaseBodies(): void {
    for (const release of this.heldBodies.splice(0)) release();
  }

  async stop(): Promise<void> {
    for (const response of this.hanging) response.destroy();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private answer(request: IncomingMessage, response: ServerResponse): void {
    request.resume();
    request.on('end', () => {
      this.keys.push(request.headers['idempotency-key'] as string | undefined);
      for (const arrived of this.arrivals.splice(0)) arrived();
      const step = this.steps.length > 1 ? this.steps.shift()! : this.steps[0];
      if (step === 'drop') return void request.socket.destroy();
      if (step === 'hang') return void this.hanging.push(response);
      response.writeHead(step.status, { 'content-type': 'application/json', ...step.headers });
      const body = JSON.stringify(step.body ?? { status: step.status });
      if (!step.holdBody) return void response.end(body);
      response.flushHeaders();
      this.hanging.push(response);
      this.heldBodies.push(() => response.end(body));
    });
  }
}

/** Records the waits instead of waiting: the retry schedule, with no sleeping in the test. */
function recorded(options: IdempotentRetryOptions = {}) {
  const delays: number[] = [];
  const retries: RetryEvent[] = [];
  return {
    delays,
    retries,
    options: {
      random: () => 0.5,
      ...options,
      sleep: async (ms: number) => void delays.push(ms),
      onRetry: (event: RetryEvent) => void retries.push(event),
    } satisfies IdempotentRetryOptions,
  };
}

const post = (body: unknown): RequestInit => ({
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify(body),
});

describe('idempotentFetch against a scripted server', () => {
  let server: ScriptedServer;
  beforeAll(async () => void (server = await new ScriptedServer().start()));
  afterAll(() => server.stop());

  it('retries a dropped connection, a 503 and a 409 with one key, waiting out Retry-After', async () => {
    server.script(
      'drop',
      { status: 503 },
      { status: 409, headers: { 'retry-after': '2' } },
      { status: 201, body: { id: 'pay_1' } },
    );
    const run = recorded({ baseDelayMs: 100 });
    const response = await idempotentFetch(`${server.url}/payments`, post({ a: 1 }), run.options);

    expect(response.status).toBe(201);
    expect(await response.json()).toEqual({ id: 'pay_1' });
    expect(server.keys).toHaveLength(4);
    expect(new Set(server.keys).size).toBe(1);
    expect(server.keys[0]).toMatch(/^[0-9a-f-]{36}$/);
    expect(run.retries.map((retry) => retry.reason)).toEqual(['network', 503, 409]);
    // Full jitter at 0.5 of 100·2^(n−1): 50, 100; then Retry-After's 2 s outweighs 200.
    expect(run.delays).toEqual([50, 100, 2000]);
  });

  it('stops after maxAttempts and returns the last answer', async () => {
    server.script({ status: 503 });
    const run = recorded({ maxAttempts: 3 });
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(503);
    expect(server.keys).toHaveLength(3);
  });

  it('does not retry an answer that retrying cannot change (422, 400, 201)', async () => {
    for (const status of [422, 400, 201]) {
      server.script({ status });
      const response = await idempotentFetch(server.url, post({}), recorded().options);
      expect(response.status).toBe(status);
      expect(server.keys).toHaveLength(1);
    }
  });

  it('cuts a Retry-After longer than maxDelayMs to maxDelayMs', async () => {
    server.script({ status: 429, headers: { 'retry-after': '120' } }, { status: 201 });
    const run = recorded({ maxDelayMs: 3000 });
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(201);
    expect(run.delays).toEqual([3000]);
  });

  it('abandons an attempt that does not answer within attemptTimeoutMs and retries it', async () => {
    server.script('hang', { status: 201 });
    const run = recorded({ attemptTimeoutMs: 200 });
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(201);
    expect(run.retries.map((retry) => retry.reason)).toEqual(['timeout']);
    expect(server.keys).toHaveLength(2);
  });

  it('throws the last network error when no attempt got an answer', async () => {
    server.script('drop');
    await expect(
      idempotentFetch(server.url, post({}), recorded({ maxAttempts: 2 }).options),
    ).rejects.toMatchObject({ name: 'TypeError', message: 'fetch failed' });
    expect(server.keys).toHaveLength(2);
  });

  it("stops at once when the caller's signal aborts, with no further attempt", async () => {
    server.script({ status: 503 });
    const controller = new AbortController();
    const attempt = idempotentFetch(server.url, post({}), {
      ...recorded().options,
      signal: controller.signal,
      onRetry: () => controller.abort(),
    });
    await expect(attempt).rejects.toMatchObject({ name: 'AbortError' });
    expect(server.keys).toHaveLength(1);
  });

  it('keeps a key the request already carries, and takes options.key over a new one', async () => {
    server.script({ status: 503 }, { status: 201 });
    await idempotentFetch(
      server.url,
      { ...post({}), headers: { 'Idempotency-Key': 'order-42' } },
      recorded().options,
    );
    expect(server.keys).toEqual(['order-42', 'order-42']);
    server.script({ status: 201 });
    await idempotentFetch(server.url, post({}), { ...recorded().options, key: 'op-7' });
    expect(server.keys).toEqual(['op-7']);
  });

  it('reads a body that arrives after attemptTimeoutMs: the timeout covers an attempt up to its headers', async () => {
    server.script({ status: 201, body: { id: 'pay_slow' }, holdBody: true });
    const run = recorded({ attemptTimeoutMs: 100 });
    const started = Date.now();
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(201);
    // The attempt's deadline passes while the body is still on its way.
    await waitUntilPast(started + 150);
    server.releaseBodies();
    expect(await response.json()).toEqual({ id: 'pay_slow' });
    expect(server.keys).toHaveLength(1);
    expect(run.retries).toEqual([]);
  });

  it("lets the caller's signal abort a body still arriving", async () => {
    server.script({ status: 201, holdBody: true });
    const controller = new AbortController();
    const response = await idempotentFetch(server.url, post({}), {
      ...recorded({ attemptTimeoutMs: 5000 }).options,
      signal: controller.signal,
    });
    controller.abort();
    await expect(response.text()).rejects.toMatchObject({ name: 'AbortError' });
  });

  it('rejects with the reason the caller aborted with, also while waiting to retry', async () => {
    server.script({ status: 503 });
    const controller = new AbortController();
    const reason = new Error('the user gave up');
    const call = idempotentFetch(server.url, post({}), {
      signal: controller.signal,
      // The default sleep, cut short by the signal.
      onRetry: () => controller.abort(reason),
    });
    await expect(call).rejects.toBe(reason);
    expect(server.keys).toHaveLength(1);
  });

  it('does not retry a replayed answer: a stored 409 is the final one', async () => {
    server.script(
      { status: 409, headers: { 'idempotent-replayed': 'true' }, body: { error: 'conflict' } },
      { status: 201 },
    );
    const run = recorded();
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(409);
    expect(await response.json()).toEqual({ error: 'conflict' });
    expect(server.keys).toHaveLength(1);
  });

  it("waits out an HTTP-date Retry-After by the server's clock (its Date header), not the caller's", async () => {
    // The server's clock is years away from ours: only the difference it states counts.
    server.script(
      {
        status: 503,
        headers: {
          date: 'Wed, 01 Jan 2031 00:00:00 GMT',
          'retry-after': 'Wed, 01 Jan 2031 00:00:03 GMT',
        },
      },
      { status: 201 },
    );
    const run = recorded();
    const response = await idempotentFetch(server.url, post({}), run.options);
    expect(response.status).toBe(201);
    expect(run.delays).toEqual([3000]);
  });

  it('refuses a Node stream or async iterable body up front: a retry could not send it again', async () => {
    server.script({ status: 503 }, { status: 201 });
    const streamed = {
      method: 'POST',
      body: Readable.from([JSON.stringify({ amount: 1 })]),
      duplex: 'half',
    } as unknown as RequestInit;
    await expect(idempotentFetch(server.url, streamed, recorded().options)).rejects.toThrow(
      /stream body cannot be sent again/,
    );
    expect(server.keys).toHaveLength(0);
  });

  it('refuses a maxAttempts that is not a number of attempts, instead of retrying forever', async () => {
    server.script({ status: 503 });
    const run = recorded({ maxAttempts: Number(undefined) });
    const call = idempotentFetch(server.url, post({}), {
      ...run.options,
      onRetry: (retry) => {
        if (retry.attempt >= 10) throw new Error('still retrying after 10 attempts');
      },
    });
    await expect(call).rejects.toThrow(/maxAttempts must be a number/);
    expect(server.keys).toHaveLength(0);
  });
});

describe("idempotentAxios through Nest's HttpModule", () => {
  let server: ScriptedServer;
  let http: HttpService;
  beforeAll(async () => {
    server = await new ScriptedServer().start();
    const moduleRef = await Test.createTestingModule({ imports: [HttpModule] }).compile();
    http = moduleRef.get(HttpService);
  });
  afterAll(() => server.stop());

  it('retries a dropped connection and a 500 with one key, and resolves with the response', async () => {
    server.script('drop', { status: 500 }, { status: 201, body: { id: 'chg_1' } });
    const run = recorded();
    const response = await idempotentAxios(
      http.axiosRef,
      { method: 'post', url: `${server.url}/charges`, data: { amount: 1 } },
      run.options,
    );
    expect(response.status).toBe(201);
    expect(response.data).toEqual({ id: 'chg_1' });
    expect(new Set(server.keys).size).toBe(1);
    expect(server.keys).toHaveLength(3);
    expect(run.retries.map((retry) => retry.reason)).toEqual(['network', 500]);
  });

  it("honours a 409's Retry-After, then rejects as axios does once attempts run out", async () => {
    server.script({ status: 409, headers: { 'retry-after': '1' } }, { status: 503 });
    const run = recorded({ maxAttempts: 3, baseDelayMs: 100 });
    const failure = idempotentAxios(
      http.axiosRef,
      { method: 'post', url: server.url, data: {} },
      run.options,
    );
    await expect(failure).rejects.toMatchObject({ response: { status: 503 } });
    expect(run.delays).toEqual([1000, 100]);
    expect(server.keys).toHaveLength(3);
  });

  it('reads a streamed body that arrives after attemptTimeoutMs (responseType: stream)', async () => {
    server.script({ status: 201, body: { id: 'chg_slow' }, holdBody: true });
    const run = recorded({ attemptTimeoutMs: 100 });
    const started = Date.now();
    const response = await idempotentAxios(
      http.axiosRef,
      { method: 'post', url: server.url, data: {}, responseType: 'stream' },
      run.options,
    );
    await waitUntilPast(started + 150);
    server.releaseBodies();
    const chunks: Buffer[] = [];
    for await (const chunk of response.data as Readable) chunks.push(chunk as Buffer);
    expect(JSON.parse(Buffer.concat(chunks).toString())).toEqual({ id: 'chg_slow' });
    expect(run.retries).toEqual([]);
  });

  it('rejects as axios does when the caller aborts an attempt (CanceledError), and stops', async () => {
    server.script('hang');
    const controller = new AbortController();
    const arrived = server.nextRequest();
    const call = idempotentAxios(
      http.axiosRef,
      { method: 'post', url: server.url, data: {}, signal: controller.signal },
      recorded().options,
    );
    await arrived;
    controller.abort();
    await expect(call).rejects.toMatchObject({ name: 'CanceledError', code: 'ERR_CANCELED' });
    expect(server.keys).toHaveLength(1);
  });

  it('refuses stream data up front: a retry could not send it again', async () => {
    server.script({ status: 503 }, { status: 201 });
    await expect(
      idempotentAxios(
        http.axiosRef,
        { method: 'post', url: server.url, data: Readable.from(['{"amount":1}']) },
        recorded().options,
      ),
    ).rejects.toThrow(/stream cannot be sent again/);
    expect(server.keys).toHaveLength(0);
  });

  it('rejects with the connection error when nothing listens', async () => {
    const closed = await new ScriptedServer().start();
    const url = closed.url;
    await closed.stop();
    const run = recorded({ maxAttempts: 2 });
    await expect(
      idempotentAxios(http.axiosRef, { method: 'post', url, data: {} }, run.options),
    ).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    expect(run.retries.map((retry) => retry.reason)).toEqual(['network']);
  });
});

describe.each(eachDatabase)('idempotentFetch against @Idempotent() on %s', (_name, database) => {
  let fixture: FixtureApp;
  let baseUrl: string;
  beforeAll(async () => {
    fixture = await createFixtureApp(database);
    await fixture.app.listen(0, '127.0.0.1');
    baseUrl = `http://127.0.0.1:${(fixture.app.getHttpServer().address() as AddressInfo).port}`;
  });
  afterAll(() => fixture.close());

  it('gives up on a slow first attempt, retries after the 409, and gets the replay: the handler ran once', async () => {
    const key = randomUUID();
    fixture.gate.hold(key);
    const reasons: RetryEvent['reason'][] = [];
    let conflictDelay: number | undefined;
    const response = await idempotentFetch(`${baseUrl}/slow`, post({}), {
      key,
      maxAttempts: 8,
      attemptTimeoutMs: (attempt) => (attempt === 1 ? 300 : 10_000),
      onRetry: (retry) => {
        reasons.push(retry.reason);
        // The first attempt still runs on the server; let it finish once a retry saw the 409.
        if (retry.reason === 409) {
          conflictDelay ??= retry.delayMs;
          fixture.gate.open(key);
        }
      },
    });
    expect(response.status).toBe(201);
    expect(response.headers.get('idempotent-replayed')).toBe('true');
    expect(reasons[0]).toBe('timeout');
    expect(reasons).toContain(409);
    // The 409's Retry-After (one second) outweighed the backoff (under 400 ms).
    expect(conflictDelay).toBe(1000);
    expect(fixture.calls.count('slow', key)).toBe(1);
  });
});
