/**
 * The system under test of the model-based suite (test/model.spec.ts): one Nest app per transport
 * and store, with two idempotent operations per transport —
 *
 * - `main`: the lease is renewed while the handler runs (every lockTimeout / 3), and a replayed
 *   2xx has the status 200 (`replayStatus`);
 * - `crashy`: `lockRenewalLimit: 0`, a process that stopped renewing its claim (a crash, a frozen
 *   event loop): a handler held there is abandoned, and a retry past `lockTimeout` takes it over;
 * - `waiting`: `concurrency: 'wait'`, duplicates in flight wait for the first request's result;
 *   its lock (ten TTLs) outlasts every clock jump of a sequence that someone waits through.
 *
 * Every handler goes through `ModelHandlers.run`, which counts its runs per record and produces the
 * outcome the test planned for that run (a value, an error of some kind, or "hold": block until
 * the test finishes it with an outcome).
 */
import {
  Body,
  Controller,
  Header,
  Headers,
  HttpException,
  Inject,
  Injectable,
  Module,
  Post,
  type CallHandler,
  type ExecutionContext,
  type NestInterceptor,
  type DynamicModule,
  type INestApplication,
  type INestMicroservice,
  type MiddlewareConsumer,
  type NestMiddleware,
  type NestModule,
} from '@nestjs/common';
import { ApolloDriver, type ApolloDriverConfig } from '@nestjs/apollo';
import {
  Args,
  Context,
  Field,
  GraphQLModule,
  Int,
  Mutation,
  ObjectType,
  Query,
  Resolver,
} from '@nestjs/graphql';
import {
  ClientProxyFactory,
  MessagePattern,
  Payload,
  RpcException,
  Transport,
  type ClientProxy,
} from '@nestjs/microservices';
import { APP_INTERCEPTOR } from '@nestjs/core';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test, type TestingModule } from '@nestjs/testing';
import { GraphQLError } from 'graphql';
import { JsonSocket } from '@nestjs/microservices/helpers/index.js';
import { randomUUID } from 'node:crypto';
import { createServer, type Socket } from 'node:net';
import { firstValueFrom } from 'rxjs';
import {
  Idempotent,
  IdempotencyModule,
  IdempotencyPurgeJob,
  IdempotencyStore,
  type IdempotencyModuleOptions,
  type IdempotencyRouteOptions,
  type MessageAcknowledgement,
} from '../../lib/index.js';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from '../../lib/idempotency.options.js';
import { HttpClient, jsonOf, type Exchange } from '../support/http-client.js';

/** The two operations of every transport (see the file's comment). */
export type RouteName = 'main' | 'crashy' | 'waiting';

/** What a handler run does, planned by the test. Some exist on one transport only. */
export type Outcome =
  /** Returns `{ run, p }`. */
  | 'ok'
  /** Returns `{ run, p, at: Date }`: a value that JSON turns into a string. */
  | 'date'
  /** HttpException 402, 404, 409: a business answer, stored and replayed. */
  | 'http402'
  | 'http404'
  | 'http409'
  /** HttpException 400, 422: what the client corrects; the default policy releases the key. */
  | 'http400'
  | 'http422'
  /** HttpException 503: released. */
  | 'http503'
  /** A plain Error: a crash, released. */
  | 'error'
  /** GraphQL: a GraphQLError with an `extensions.code` only (stored, README "GraphQL mutations"). */
  | 'gqlCode'
  /** GraphQL: a GraphQLError with `extensions.code` and `extensions.http.status` 402. */
  | 'gqlCode402'
  /** RPC: an RpcException without `statusCode` (stored, README "Microservice handlers"). */
  | 'rpcNoStatus'
  /** RPC: an RpcException with `statusCode: 402`. */
  | 'rpcStatus402';

/** The fixed instant of the `date` outcome. */
export const DATE_VALUE = new Date('2026-04-01T12:34:56.789Z');

/** A handler run held by the test: it reports its arrival and waits for its outcome. */
export class Hold {
  private arrive!: () => void;
  private finish!: (outcome: Outcome) => void;
  /** Resolves once a handler run took this hold and is waiting in it. */
  readonly arrived = new Promise<void>((resolve) => (this.arrive = resolve));
  readonly outcome = new Promise<Outcome>((resolve) => (this.finish = resolve));
  taken = false;

  take(): Promise<Outcome> {
    this.taken = true;
    this.arrive();
    return this.outcome;
  }

  release(outcome: Outcome): void {
    this.finish(outcome);
  }
}

/** What the test plans for the next handler run of a record. */
export type Plan = Outcome | Hold;

/**
 * The handlers' common body. The test plans the next run of a record (`plan`), and reads how many
 * times each record's handler ran (`runs`). A record is named by the test (`route|scope|key`) and
 * the name travels with the request outside its fingerprint (HTTP and GraphQL: a header; RPC: a
 * payload field, constant per record).
 */
@Injectable()
export class ModelHandlers {
  private readonly plans = new Map<string, Plan>();
  private readonly counts = new Map<string, number>();

  plan(record: string, plan: Plan): void {
    this.plans.set(record, plan);
  }

  unplan(record: string, plan: Plan): void {
    if (this.plans.get(record) === plan) this.plans.delete(record);
  }

  runs(record: string): number {
    return this.counts.get(record) ?? 0;
  }

  private readonly arrivals = new Map<string, number>();
  private arrivalListeners = new Set<() => void>();

  /** How many requests for the record reached the app's interceptors (see ArrivalInterceptor). */
  arrived(record: string): number {
    return this.arrivals.get(record) ?? 0;
  }

  /** Resolves once `count` requests for the record have arrived. */
  async whenArrived(record: string, count: number): Promise<void> {
    while (this.arrived(record) < count)
      await new Promise<void>((resolve) => this.arrivalListeners.add(resolve));
  }

  arrive(record: string): void {
    this.arrivals.set(record, this.arrived(record) + 1);
    const listeners = this.arrivalListeners;
    this.arrivalListeners = new Set();
    for (const listener of listeners) listener();
  }

  async run(record: string, p: unknown): Promise<unknown> {
    const run = (this.counts.get(record) ?? 0) + 1;
    this.counts.set(record, run);
    let plan = this.plans.get(record) ?? 'ok';
    this.plans.delete(record);
    if (plan instanceof Hold) plan = await plan.take();
    return produce(plan, run, p);
  }
}

function produce(outcome: Outcome, run: number, p: unknown): unknown {
  switch (outcome) {
    case 'ok':
      return { run, p, at: null };
    case 'date':
      return { run, p, at: DATE_VALUE };
    case 'http402':
    case 'http404':
    case 'http409':
      throw new HttpException({ code: 'refused', run }, Number(outcome.slice(4)));
    case 'http400':
    case 'http422':
      throw new HttpException({ code: 'invalid', run }, Number(outcome.slice(4)));
    case 'http503':
      throw new HttpException({ code: 'unavailable', run }, 503);
    case 'error':
      throw new Error(`handler crashed in run ${run}`);
    case 'gqlCode':
      throw new GraphQLError(`declined in run ${run}`, { extensions: { code: 'CARD_DECLINED' } });
    case 'gqlCode402':
      throw new GraphQLError(`declined in run ${run}`, {
        extensions: { code: 'CARD_DECLINED', http: { status: 402 } },
      });
    case 'rpcNoStatus':
      throw new RpcException({ code: 'declined', run });
    case 'rpcStatus402':
      throw new RpcException({ code: 'declined', statusCode: 402, run });
  }
}

/**
 * Counts each request as it reaches the app's interceptors (a global one runs before
 * `@Idempotent()`'s), so a test knows a duplicate has begun to wait: the module fixes a waiter's
 * deadline before its first read of the store, in the same turn of the event loop.
 */
@Injectable()
class ArrivalInterceptor implements NestInterceptor {
  constructor(private readonly handlers: ModelHandlers) {}

  intercept(context: ExecutionContext, next: CallHandler) {
    const record = recordOfCall(context);
    if (record !== undefined) this.handlers.arrive(record);
    return next.handle();
  }
}

function recordOfCall(context: ExecutionContext): string | undefined {
  const type = context.getType<string>();
  if (type === 'rpc') {
    const record = (context.switchToRpc().getData() as RpcPayload | undefined)?.record;
    return typeof record === 'string' ? record : undefined;
  }
  const request = (
    type === 'graphql'
      ? (context.getArgs()[2] as GraphQLContext | undefined)?.req
      : context.switchToHttp().getRequest()
  ) as { headers?: Record<string, unknown> } | undefined;
  const header = request?.headers?.['x-model-record'];
  return typeof header === 'string' ? decodeURIComponent(header) : undefined;
}

/**
 * Scopes travel as `encodeURIComponent(scope)` (so a trailing space survives a header), and `#42`
 * stands for the number 42 (a resolver that returns a user id as a number).
 */
export function wireScope(scope: string | number): string {
  return typeof scope === 'number' ? `#${scope}` : encodeURIComponent(scope);
}

function scopeFromWire(wire: unknown): string {
  if (typeof wire !== 'string') return '';
  // The number is returned as it is: what a resolver typed `(req) => req.user.id` returns.
  return (wire.startsWith('#') ? Number(wire.slice(1)) : decodeURIComponent(wire)) as string;
}

/** HTTP and GraphQL: the request's x-scope header; RPC: the payload's `scope` field. */
const scope = (source: unknown) => {
  const rpc = source as { data?: { scope?: unknown } } | undefined;
  if (rpc && 'data' in rpc) return scopeFromWire(rpc.data?.scope);
  const request = source as { headers?: Record<string, unknown> } | undefined;
  return scopeFromWire(request?.headers?.['x-scope']);
};

export const LOCK_TIMEOUT_MS = 300;
export const TTL_MS = 3_600_000;
/** The `waiting` route's lockTimeout: never renewed within a test (every 3h20 of real time). */
const WAITING_LOCK_TIMEOUT_MS = 10 * TTL_MS;
export const WAIT_TIMEOUT_MS = 10_000;

/** The lockTimeout of each route. */
export const lockTimeoutOf = (route: RouteName) =>
  route === 'waiting' ? WAITING_LOCK_TIMEOUT_MS : LOCK_TIMEOUT_MS;

/**
 * How the module settled each message (RPC routes' `acknowledge`), in order: `done`,
 * `done replayed`, `retry` or `drop`. One app runs at a time, so one list serves them all.
 */
const settledMessages: string[] = [];
const acknowledge: MessageAcknowledgement = (_context, settled) => {
  settledMessages.push(
    settled.kind === 'done' && settled.replayed ? 'done replayed' : settled.kind,
  );
};

/** `main` replays a stored 2xx as 200 (HTTP's `replayStatus`; no status elsewhere). */
export const MAIN_REPLAY_STATUS = 200;

const ROUTE_OPTIONS: Record<RouteName, IdempotencyRouteOptions> = {
  main: {
    lockTimeout: LOCK_TIMEOUT_MS,
    lockRenewalLimit: '7d',
    concurrency: 'reject',
    scope,
    replayStatus: MAIN_REPLAY_STATUS,
  },
  crashy: { lockTimeout: LOCK_TIMEOUT_MS, lockRenewalLimit: 0, concurrency: 'reject', scope },
  waiting: {
    lockTimeout: WAITING_LOCK_TIMEOUT_MS,
    concurrency: 'wait',
    waitTimeout: WAIT_TIMEOUT_MS,
    scope,
  },
};

type HttpBody = { p?: unknown };

@Controller('model')
class ModelHttpController {
  constructor(private readonly handlers: ModelHandlers) {}

  @Post('main')
  @Idempotent(ROUTE_OPTIONS.main)
  @Header('X-Model', 'handler')
  main(@Body() body: HttpBody, @Headers('x-model-record') record: string) {
    return this.handlers.run(decodeURIComponent(record), body.p);
  }

  @Post('crashy')
  @Idempotent(ROUTE_OPTIONS.crashy)
  @Header('X-Model', 'handler')
  crashy(@Body() body: HttpBody, @Headers('x-model-record') record: string) {
    return this.handlers.run(decodeURIComponent(record), body.p);
  }

  @Post('waiting')
  @Idempotent(ROUTE_OPTIONS.waiting)
  @Header('X-Model', 'handler')
  waiting(@Body() body: HttpBody, @Headers('x-model-record') record: string) {
    return this.handlers.run(decodeURIComponent(record), body.p);
  }
}

/**
 * The same two HTTP operations as in `ModelHttpController`, written the way apps share handlers:
 * one base class, a controller per route with class-level `@Idempotent()` options. Both routes
 * run the one inherited handler function.
 */
abstract class ModelRouteController {
  constructor(@Inject(ModelHandlers) private readonly handlers: ModelHandlers) {}

  @Post()
  @Header('X-Model', 'handler')
  handle(@Body() body: HttpBody, @Headers('x-model-record') record: string) {
    return this.handlers.run(decodeURIComponent(record), body.p);
  }
}

@Controller('model/main')
@Idempotent(ROUTE_OPTIONS.main)
class MainRouteController extends ModelRouteController {}

@Controller('model/crashy')
@Idempotent(ROUTE_OPTIONS.crashy)
class CrashyRouteController extends ModelRouteController {}

@Controller('model/waiting')
@Idempotent(ROUTE_OPTIONS.waiting)
class WaitingRouteController extends ModelRouteController {}

/** Echoes the request's x-request-tag on its response: a header each response has of its own. */
class RequestTagMiddleware implements NestMiddleware {
  use(
    request: { headers: Record<string, unknown> },
    response: { setHeader(name: string, value: string): void },
    next: () => void,
  ) {
    const tag = request.headers['x-request-tag'];
    if (typeof tag === 'string') response.setHeader('X-Request-Tag', tag);
    next();
  }
}

@ObjectType()
class ModelResult {
  @Field(() => Int)
  run!: number;

  @Field(() => Int)
  p!: number;

  @Field(() => Date, { nullable: true })
  at!: Date | null;
}

type GraphQLContext = { req: { headers: Record<string, unknown> } };

/** Code first: `modelMain(p, idempotencyKey)` and `modelCrashy(…)`. */
@Resolver()
class ModelResolver {
  constructor(private readonly handlers: ModelHandlers) {}

  @Query(() => String)
  ping() {
    return 'pong';
  }

  @Mutation(() => ModelResult)
  @Idempotent(ROUTE_OPTIONS.main)
  modelMain(
    @Args('p', { type: () => Int }) p: number,
    @Context() context: GraphQLContext,
    @Args('idempotencyKey', { type: () => String, nullable: true }) _key?: string,
  ) {
    return this.handlers.run(recordHeader(context), p);
  }

  @Mutation(() => ModelResult)
  @Idempotent(ROUTE_OPTIONS.crashy)
  modelCrashy(
    @Args('p', { type: () => Int }) p: number,
    @Context() context: GraphQLContext,
    @Args('idempotencyKey', { type: () => String, nullable: true }) _key?: string,
  ) {
    return this.handlers.run(recordHeader(context), p);
  }

  @Mutation(() => ModelResult)
  @Idempotent(ROUTE_OPTIONS.waiting)
  modelWaiting(
    @Args('p', { type: () => Int }) p: number,
    @Context() context: GraphQLContext,
    @Args('idempotencyKey', { type: () => String, nullable: true }) _key?: string,
  ) {
    return this.handlers.run(recordHeader(context), p);
  }
}

function recordHeader(context: GraphQLContext): string {
  return decodeURIComponent(String(context.req.headers['x-model-record']));
}

type RpcPayload = { p?: unknown; record?: string };

@Controller()
class ModelRpcController {
  constructor(private readonly handlers: ModelHandlers) {}

  @MessagePattern('model.main')
  @Idempotent({ ...ROUTE_OPTIONS.main, acknowledge })
  main(@Payload() data: RpcPayload) {
    return this.handlers.run(String(data.record), data.p);
  }

  @MessagePattern('model.crashy')
  @Idempotent({ ...ROUTE_OPTIONS.crashy, acknowledge })
  crashy(@Payload() data: RpcPayload) {
    return this.handlers.run(String(data.record), data.p);
  }

  @MessagePattern('model.waiting')
  @Idempotent({ ...ROUTE_OPTIONS.waiting, acknowledge })
  waiting(@Payload() data: RpcPayload) {
    return this.handlers.run(String(data.record), data.p);
  }
}

/** The transports the suite runs on. */
export type TransportName = 'http-express' | 'http-fastify' | 'graphql' | 'rpc-tcp';

/** One request as the test describes it, before a transport puts it on the wire. */
export interface WireRequest {
  readonly route: RouteName;
  /** The Idempotency-Key as sent (bare or an RFC 8941 quoted string); undefined: none. */
  readonly key: string | undefined;
  readonly scope: string | number;
  readonly p: number;
  /** The test's name of the record (see ModelHandlers). */
  readonly record: string;
  /** A value of this request alone (HTTP: echoed by a middleware). */
  readonly tag: string;
  /**
   * How the client serialises the same payload (0 or 1): HTTP and RPC put the payload's members
   * in another order, GraphQL passes `p` inline instead of as a variable. The fingerprint must
   * not change (canonical JSON; the field's arguments).
   */
  readonly spelling: number;
}

/** What came back, in the raw form of the transport. */
export type RawAnswer =
  | { readonly kind: 'http'; readonly exchange: Exchange; readonly tag: string }
  | { readonly kind: 'graphql'; readonly exchange: Exchange; readonly field: string }
  | { readonly kind: 'rpc'; readonly ok: true; readonly reply: unknown }
  | { readonly kind: 'rpc'; readonly ok: false; readonly error: unknown };

/** A booted app of one transport: send requests, read counts and plan runs. */
export interface ModelApp {
  readonly transport: TransportName;
  readonly handlers: ModelHandlers;
  /** The record's endpoint as the module names it (the records' primary key, with scope and key). */
  endpointOf(route: RouteName): string;
  send(request: WireRequest): Promise<RawAnswer>;
  /** RPC: how the messages answered since the last call were settled (see `acknowledge`). */
  takeSettled(): string[];
  /** Runs the purge job once (`IdempotencyPurgeJob.purgeNow()`); resolves to the rows deleted. */
  purgeNow(): Promise<number>;
  close(): Promise<void>;
}

function takeSettled(): string[] {
  return settledMessages.splice(0);
}

const GRAPHQL_FIELDS: Record<RouteName, string> = {
  main: 'modelMain',
  crashy: 'modelCrashy',
  waiting: 'modelWaiting',
};

/** The mutation field of a route. */
export const graphqlFieldOf = (route: RouteName) => GRAPHQL_FIELDS[route];

/**
 * Nest's TCP framing with Nagle's algorithm off: without it every small request and reply waits
 * for the peer's delayed ACK (tens of milliseconds each), which would make the RPC runs several
 * times slower than the HTTP ones. Nothing the module sees changes.
 */
class NoDelayJsonSocket extends JsonSocket {
  constructor(socket: Socket) {
    socket.setNoDelay(true);
    super(socket);
  }
}

/** A free TCP port of 127.0.0.1. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/**
 * Returns once the process hears what operators delete, when its store tells it (PostgreSQL's
 * listener, Redis's subscriber). The listening starts with the first record cached; once it is
 * live, the records cached before it are checked against the store, and a row deleted by hand
 * meanwhile is dropped (docs/operations.md "Replay caches"). The model predicts that a row deleted by hand
 * still replays from the cache, which holds only from then on (and while the connection stays up:
 * a loss empties the cache, which the model leaves out). So the probe (`onInvalidated`, which also
 * opens the connection) tells whether the store tells; if it does, a record that is not stored is
 * cached here, and its check (which drops it) is awaited.
 */
async function untilInvalidationsHeard(moduleRef: TestingModule): Promise<void> {
  const store = moduleRef.get<IdempotencyStore>(IdempotencyStore);
  const cache = moduleRef.get<ResolvedModuleOptions>(RESOLVED_OPTIONS).replayCache;
  const stop = store.onInvalidated?.(() => undefined);
  if (!cache || !stop) return;
  stop();
  const checked = new Promise<void>((resolve) => {
    const revalidate = cache.revalidate.bind(cache);
    cache.revalidate = (stillStored) => revalidate(stillStored).finally(resolve);
  });
  const id = { scope: '', endpoint: 'model warm-up', key: randomUUID() };
  cache.set(id, {
    fingerprint: '',
    token: '',
    expiresAt: Date.now() + 60_000,
    response: { status: 200, headers: {}, body: null, bodyEncoding: 'json', isError: false },
  });
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    checked,
    new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error('model: the store never started telling this process of deletions')),
        20_000,
      );
    }),
  ]).finally(() => clearTimeout(timer));
  if (cache.get(id, Date.now()))
    throw new Error('model: the replay cache kept a record that is not stored');
}

/**
 * Boots the app of `transport` with the module's `options` (its store). `logger`: Nest's logging,
 * off unless MODEL_LOG=1.
 */
export async function createModelApp(
  transport: TransportName,
  options: IdempotencyModuleOptions,
  settings: { readonly baseClassControllers: boolean },
): Promise<ModelApp> {
  const graphql = transport === 'graphql';
  const httpControllers = settings.baseClassControllers
    ? [MainRouteController, CrashyRouteController, WaitingRouteController]
    : [ModelHttpController];
  const imports: DynamicModule[] = [IdempotencyModule.forRoot(options)];
  if (graphql) {
    imports.push(
      GraphQLModule.forRoot<ApolloDriverConfig>({
        driver: ApolloDriver,
        autoSchemaFile: true,
        context: ({ req }: { req: unknown }) => ({ req }),
      }),
    );
  }

  @Module({
    imports,
    controllers: transport === 'rpc-tcp' ? [ModelRpcController] : graphql ? [] : httpControllers,
    providers: [
      ModelHandlers,
      { provide: APP_INTERCEPTOR, useClass: ArrivalInterceptor },
      ...(graphql ? [ModelResolver] : []),
    ],
  })
  class ModelModule implements NestModule {
    configure(consumer: MiddlewareConsumer) {
      if (!graphql && transport !== 'rpc-tcp')
        consumer.apply(RequestTagMiddleware).forRoutes(...httpControllers);
    }
  }

  const moduleRef = await Test.createTestingModule({ imports: [ModelModule] }).compile();
  const logger = process.env.MODEL_LOG === '1' ? undefined : (false as const);
  const handlers = moduleRef.get(ModelHandlers);
  const purgeJob = moduleRef.get(IdempotencyPurgeJob);
  const purgeNow = () => purgeJob.purgeNow();

  if (transport === 'rpc-tcp') {
    const port = await freePort();
    const app: INestMicroservice = moduleRef.createNestMicroservice({
      transport: Transport.TCP,
      options: { host: '127.0.0.1', port, socketClass: NoDelayJsonSocket },
      logger,
    });
    await app.listen();
    await untilInvalidationsHeard(moduleRef).catch(async (error: unknown) => {
      await app.close();
      throw error;
    });
    const client: ClientProxy = ClientProxyFactory.create({
      transport: Transport.TCP,
      options: { host: '127.0.0.1', port, socketClass: NoDelayJsonSocket },
    });
    await client.connect();
    return {
      transport,
      handlers,
      takeSettled,
      purgeNow,
      endpointOf: (route) => `RPC ModelRpcController.${route} model.${route}`,
      async send(request) {
        const members: [string, unknown][] = [
          ['p', request.p],
          ['scope', wireScope(request.scope)],
          ['record', request.record],
        ];
        if (request.key !== undefined) members.push(['idempotencyKey', request.key]);
        const data = Object.fromEntries(request.spelling ? members.reverse() : members);
        try {
          const reply = await firstValueFrom(client.send(`model.${request.route}`, data));
          return { kind: 'rpc', ok: true, reply };
        } catch (error) {
          return { kind: 'rpc', ok: false, error };
        }
      },
      async close() {
        await client.close();
        await app.close();
      },
    };
  }

  const app: INestApplication =
    transport === 'http-fastify'
      ? moduleRef.createNestApplication(new FastifyAdapter(), { logger })
      : moduleRef.createNestApplication({ logger });
  await app.listen(0, '127.0.0.1');
  await untilInvalidationsHeard(moduleRef).catch(async (error: unknown) => {
    await app.close();
    throw error;
  });
  const address = app.getHttpServer().address() as { port: number };
  const client = new HttpClient(`http://127.0.0.1:${address.port}`, 64);
  const commonHeaders = (request: WireRequest): Record<string, string> => ({
    'x-scope': wireScope(request.scope),
    'x-model-record': encodeURIComponent(request.record),
    'x-request-tag': request.tag,
  });

  if (graphql) {
    return {
      transport,
      handlers,
      takeSettled,
      purgeNow,
      endpointOf: (route) =>
        `GRAPHQL Mutation.${GRAPHQL_FIELDS[route]} as ${GRAPHQL_FIELDS[route]}`,
      async send(request) {
        const field = GRAPHQL_FIELDS[request.route];
        const query = request.spelling
          ? `mutation M($key: String) { ${field}(idempotencyKey: $key, p: ${request.p}) { run p at } }`
          : `mutation M($p: Int!, $key: String) { ${field}(p: $p, idempotencyKey: $key) { run p at } }`;
        const variables: Record<string, unknown> = request.spelling ? {} : { p: request.p };
        if (request.key !== undefined) variables.key = request.key;
        const exchange = await client.send('/graphql', {
          body: { query, variables },
          headers: commonHeaders(request),
          deadlineMs: 20_000,
        });
        return { kind: 'graphql', exchange, field };
      },
      async close() {
        client.close();
        await app.close();
      },
    };
  }

  return {
    transport,
    handlers,
    takeSettled,
    purgeNow,
    endpointOf: (route) => `POST /model/${route}`,
    async send(request) {
      const headers = commonHeaders(request);
      if (request.key !== undefined) headers['Idempotency-Key'] = request.key;
      const exchange = await client.send(`/model/${request.route}`, {
        body: request.spelling ? { note: 'same', p: request.p } : { p: request.p, note: 'same' },
        headers,
        deadlineMs: 20_000,
      });
      return { kind: 'http', exchange, tag: request.tag };
    },
    async close() {
      client.close();
      await app.close();
    },
  };
}

export { jsonOf };
