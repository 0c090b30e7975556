import { context, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
  type ReadableSpan,
} from '@opentelemetry/sdk-trace-base';
import type { LoggerService } from '@nestjs/common';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import {
  idempotencyChannelName,
  type IdempotencyEvent,
  type IdempotencyEventMessage,
  type IdempotencyStore,
} from '../lib/index.js';
import {
  createFixtureApp,
  recordsOf,
  stealClaim,
  waitUntilPast,
  type FixtureApp,
} from './fixtures/fixture-app.js';
import { testDatabases } from './support/databases.js';
import { expectProblem, newKey, post } from './support/http.js';

const EVENTS: IdempotencyEvent[] = [
  'executed',
  'replayed',
  'conflict',
  'mismatch',
  'released',
  'lease-lost',
];

describe('OpenTelemetry spans and diagnostics_channel events', () => {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  const contextManager = new AsyncLocalStorageContextManager();
  const published: IdempotencyEventMessage[] = [];
  const onMessage = (message: unknown) => published.push(message as IdempotencyEventMessage);
  let fixture: FixtureApp;

  beforeAll(async () => {
    context.setGlobalContextManager(contextManager.enable());
    trace.setGlobalTracerProvider(provider);
    for (const event of EVENTS) subscribe(idempotencyChannelName(event), onMessage);
    fixture = await createFixtureApp(testDatabases[0]);
  });
  afterAll(async () => {
    for (const event of EVENTS) unsubscribe(idempotencyChannelName(event), onMessage);
    await fixture.close();
    trace.disable();
    context.disable();
    await provider.shutdown();
  });
  beforeEach(() => {
    exporter.reset();
    published.length = 0;
  });

  /** The module's spans of one key, by name. */
  function spansOf(key: string): Record<string, ReadableSpan[]> {
    const byName: Record<string, ReadableSpan[]> = {};
    for (const span of exporter.getFinishedSpans()) {
      if (span.attributes['idempotency.key'] !== key) continue;
      (byName[span.name] ??= []).push(span);
    }
    return byName;
  }

  function eventsOf(key: string): IdempotencyEvent[] {
    return published.filter((message) => message.id?.key === key).map((message) => message.event);
  }

  it('traces the claim, the run (with the handler’s spans inside) and the completion of a first request', async () => {
    const key = newKey();
    await post(fixture.http, '/traced', key).expect(201);
    const spans = spansOf(key);
    expect(
      spans['idempotency.claim'].map((span) => span.attributes['idempotency.outcome']),
    ).toEqual(['executed']);
    expect(spans['idempotency.run'].map((span) => span.attributes['idempotency.outcome'])).toEqual([
      'returned',
    ]);
    expect(
      spans['idempotency.complete'].map((span) => span.attributes['idempotency.outcome']),
    ).toEqual(['stored']);
    expect(spans['idempotency.claim'][0].attributes['idempotency.endpoint']).toBe('POST /traced');

    const [run] = spans['idempotency.run'];
    const handler = exporter
      .getFinishedSpans()
      .find(
        (span) =>
          span.name === 'handler.work' && span.spanContext().traceId === run.spanContext().traceId,
      );
    expect(handler?.parentSpanContext?.spanId).toBe(run.spanContext().spanId);
    expect(eventsOf(key)).toEqual(['executed']);
  });

  it('a replay is a claim span with outcome replayed, and nothing else', async () => {
    const key = newKey();
    await post(fixture.http, '/traced', key).expect(201);
    exporter.reset();
    published.length = 0;
    const retry = await post(fixture.http, '/traced', key).expect(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    const spans = spansOf(key);
    expect(Object.keys(spans)).toEqual(['idempotency.claim']);
    expect(spans['idempotency.claim'][0].attributes['idempotency.outcome']).toBe('replayed');
    expect(eventsOf(key)).toEqual(['replayed']);
  });

  it('a reused key and a duplicate in flight: mismatch and conflict', async () => {
    const key = newKey();
    await post(fixture.http, '/charges', key, { amount: 1 }).expect(201);
    expectProblem(await post(fixture.http, '/charges', key, { amount: 2 }), 422, 'key-reused');

    const held = newKey();
    fixture.gate.hold(held);
    const first = post(fixture.http, '/slow', held).then((response) => response);
    await fixture.gate.arrived(held);
    expectProblem(await post(fixture.http, '/slow', held), 409, 'request-in-progress');
    fixture.gate.open(held);
    expect((await first).status).toBe(201);

    expect(eventsOf(key)).toEqual(['executed', 'mismatch']);
    expect(eventsOf(held)).toEqual(['executed', 'conflict']);
    const heldClaims = spansOf(held)['idempotency.claim'];
    expect(heldClaims.map((span) => span.attributes['idempotency.outcome']).sort()).toEqual([
      'conflict',
      'executed',
    ]);
  });

  it('a crash: the run span records the error, the completion releases the key', async () => {
    const key = newKey();
    expect((await post(fixture.http, '/flaky', key, { fail: 'crash' })).status).toBe(500);
    const spans = spansOf(key);
    const [run] = spans['idempotency.run'];
    expect(run.attributes['idempotency.outcome']).toBe('threw');
    expect(run.status.code).toBe(2); // SpanStatusCode.ERROR
    expect(run.events.map((event) => event.name)).toContain('exception');
    expect(spans['idempotency.complete'][0].attributes['idempotency.outcome']).toBe('released');
    expect(eventsOf(key)).toEqual(['executed', 'released']);
  });

  it('a claim taken over while the handler ran: the completion says lease-lost, and so does the channel', async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/slow', key).then((response) => response);
    await fixture.gate.arrived(key);
    await stealClaim(fixture.dataSource, key);
    fixture.gate.open(key);
    expect((await first).status).toBe(201);
    expect(spansOf(key)['idempotency.complete'][0].attributes['idempotency.outcome']).toBe(
      'lease-lost',
    );
    expect(eventsOf(key)).toEqual(['executed', 'lease-lost']);
    expect(published.find((message) => message.event === 'lease-lost')).toMatchObject({
      count: 1,
      id: { scope: '', endpoint: 'POST /slow', key },
    });
  });
});

describe('observation that fails never changes an outcome', () => {
  /** A span processor whose exporter is broken: it throws on every span. */
  const throwing = {
    onStart: () => {
      throw new Error('span processor is broken');
    },
    onEnd: () => {
      throw new Error('span processor is broken');
    },
    forceFlush: () => Promise.resolve(),
    shutdown: () => Promise.resolve(),
  };
  const provider = new BasicTracerProvider({ spanProcessors: [throwing] });
  /** Nest's own lines pass; the module's (context 'Idempotency') throw, as a broken transport would. */
  const logger = Object.fromEntries(
    (['log', 'error', 'warn', 'debug', 'verbose', 'fatal'] as const).map((level) => [
      level,
      (...args: unknown[]) => {
        if (args.at(-1) === 'Idempotency') throw new Error('log transport is broken');
      },
    ]),
  ) as unknown as LoggerService;
  let fixture: FixtureApp;

  beforeAll(async () => {
    trace.setGlobalTracerProvider(provider);
    fixture = await createFixtureApp(testDatabases[0], { maxResponseBytes: 10_000 }, 'express', {
      logger,
    });
  });
  afterAll(async () => {
    await fixture.close();
    trace.disable();
    await provider.shutdown();
  });

  it('a tracer that throws: the request is answered, stored once and replayed', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/charges', key, { amount: 1 });
    expect(first.status).toBe(201);
    const retry = await post(fixture.http, '/charges', key, { amount: 1 });
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    expect(fixture.calls.count('charges', key)).toBe(1);
  });

  it("a logger that throws: a lost lease is still answered with the handler's response", async () => {
    const key = newKey();
    fixture.gate.hold(key);
    const first = post(fixture.http, '/slow', key).then((response) => response);
    await fixture.gate.arrived(key);
    await stealClaim(fixture.dataSource, key);
    fixture.gate.open(key);
    const response = await first;
    expect(response.status).toBe(201);
    expect(response.body.id).toEqual(expect.any(String));
  });

  it('a logger that throws: a response over maxResponseBytes is still sent, and its key released', async () => {
    const key = newKey();
    const first = await post(fixture.http, '/big', key, { bytes: 20_000 });
    expect(first.status).toBe(201);
    expect(first.body.padding).toHaveLength(20_000);
    const retry = await post(fixture.http, '/big', key, { bytes: 20_000 });
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBeUndefined();
    expect(fixture.calls.count('big', key)).toBe(2);
  });

  it('a logger that throws: purgeNow() still purges and resolves (its log line is dropped)', async () => {
    const key = newKey();
    expect((await post(fixture.http, '/short-ttl', key)).status).toBe(201);
    await waitUntilPast(Number((await recordsOf(fixture.dataSource, key))[0].expiresAt));
    expect(await fixture.purgeJob.purgeNow()).toBeGreaterThanOrEqual(1);
    expect(await recordsOf(fixture.dataSource, key)).toEqual([]);
  });

  it('a logger that throws: a store that cannot be reached is still a 503, the handler not run', async () => {
    const down = () => Promise.reject(new Error('connect ECONNREFUSED 127.0.0.1:5432'));
    const store: IdempotencyStore = {
      claim: down,
      complete: down,
      release: down,
      renew: down,
      purgeExpired: down,
    };
    const outage = await createFixtureApp(testDatabases[0], { store }, 'express', { logger });
    try {
      const key = newKey();
      expectProblem(
        await post(outage.http, '/charges', key, { amount: 1 }),
        503,
        'store-unavailable',
      );
      expect(outage.calls.count('charges', key)).toBe(0);
    } finally {
      await outage.close();
    }
  });
});
