import {
  ClassSerializerInterceptor,
  Inject,
  Injectable,
  Logger,
  type OnApplicationBootstrap,
  type OnModuleInit,
} from '@nestjs/common';
import {
  INTERCEPTORS_METADATA,
  PATH_METADATA,
  RESPONSE_PASSTHROUGH_METADATA,
  ROUTE_ARGS_METADATA,
  SSE_METADATA,
} from '@nestjs/common/constants.js';
import { RouteParamtypes } from '@nestjs/common/enums/route-paramtypes.enum.js';
import { ApplicationConfig, DiscoveryService, MetadataScanner } from '@nestjs/core';
import { IdempotencyInterceptor, isIdempotencyInterceptor } from './idempotency.interceptor.js';
import { IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import {
  controllerRouteOptions,
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
  type TransportType,
} from '../idempotency.options.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import { IdempotencyStore } from '../storage/idempotency-store.interface.js';
import { GraphQLTransport } from '../transports/graphql.transport.js';
import { HttpTransport } from '../transports/http.transport.js';
import { RpcTransport } from '../transports/rpc.transport.js';
import { routePlanOf } from './route-plan.js';

/** What `@nestjs/microservices`' pattern decorators set on a message handler. */
const PATTERN_METADATA = 'microservices:pattern';

/** What @nestjs/graphql's `@ResolveField()` sets on its method (the package is never imported). */
const GRAPHQL_RESOLVE_FIELD_METADATA = 'graphql:resolve_property';

/**
 * Refuses, at startup, `@Idempotent()` routes (controllers' handlers and GraphQL resolvers' fields)
 * whose response the interceptor can never see: a
 * handler that writes the response itself (`@Res()` / `@Next()` without `passthrough`) or streams
 * server-sent events, a GraphQL field below the root of a mutation (`@ResolveField()`). Left alone,
 * such a route would look protected and run on every retry. Also
 * refuses transactional routes on a store that cannot run them (see `transactionsUnsupported`),
 * and warns about a ClassSerializerInterceptor that runs outside the idempotency interceptor. Tells
 * the RPC transport which message handlers acknowledge (event handlers of one event settle
 * together).
 */
@Injectable()
export class IdempotentRoutesCheck implements OnModuleInit, OnApplicationBootstrap {
  /** The `@Idempotent()` routes: name, controller and method. */
  private readonly routes: {
    readonly name: string;
    readonly controller: Function;
    readonly handler: Function;
  }[] = [];

  constructor(
    private readonly config: ApplicationConfig,
    private readonly discovery: DiscoveryService,
    private readonly scanner: MetadataScanner,
    @Inject(RESOLVED_OPTIONS) private readonly options: ResolvedModuleOptions,
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
    private readonly rpc: RpcTransport,
    private readonly http: HttpTransport,
    private readonly graphql: GraphQLTransport,
  ) {}

  onModuleInit(): void {
    const problems: string[] = [];
    const misconfigured: string[] = [];
    const transactional: string[] = [];
    const transports = { http: this.http, graphql: this.graphql, rpc: this.rpc };
    const acknowledging: Function[] = [];
    // Controllers (HTTP routes, message handlers) and providers (GraphQL resolvers).
    const controllers = new Set(this.discovery.getControllers());
    const classes = [
      ...controllers,
      ...this.discovery.getProviders().filter((wrapper) => !wrapper.isNotMetatype),
    ];
    for (const wrapper of classes) {
      const { metatype } = wrapper;
      const instance: unknown = wrapper.instance;
      if (!instance || !metatype || typeof metatype !== 'function') continue;
      const prototype = Object.getPrototypeOf(instance) as Record<string, Function>;
      const classOptions = controllerRouteOptions(metatype);
      for (const method of this.scanner.getAllMethodNames(prototype)) {
        const handler = prototype[method];
        const handlerOptions = Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, handler) as
          IdempotencyRouteOptions | undefined;
        if (!classOptions && !handlerOptions) continue;
        this.routes.push({ name: `${metatype.name}.${method}`, controller: metatype, handler });
        const reason = controllers.has(wrapper)
          ? unsupportedReason(metatype, method, handler)
          : handlerOptions && Reflect.getMetadata(GRAPHQL_RESOLVE_FIELD_METADATA, handler) === true
            ? 'it is a @ResolveField(), and only root mutation fields are protected (a namespaced mutation, `mutation { accounts { open } }`, runs on every retry)'
            : undefined;
        if (reason) problems.push(`${metatype.name}.${method}: ${reason}`);
        // The route's plan, compiled once here (the interceptor uses it): the method's options
        // over the class's over the module's, field by field, checked.
        let options: ResolvedRouteOptions;
        try {
          options = routePlanOf(
            this.options,
            transports,
            metatype,
            handler,
            isIdempotencyInterceptor,
          ).options;
        } catch (error) {
          misconfigured.push(`${metatype.name}.${method}: ${(error as Error).message}`);
          continue;
        }
        const transport: TransportType | undefined = !controllers.has(wrapper)
          ? 'graphql'
          : Reflect.getMetadata(PATTERN_METADATA, handler) !== undefined
            ? 'rpc'
            : Reflect.getMetadata(PATH_METADATA, handler) !== undefined
              ? 'http'
              : undefined;
        const keyProblem = transport && keySourceProblem(options, transport);
        if (keyProblem) misconfigured.push(`${metatype.name}.${method}: ${keyProblem}`);
        if (options.transactional) transactional.push(`${metatype.name}.${method}`);
        if (options.acknowledge && controllers.has(wrapper)) acknowledging.push(handler);
      }
    }
    if (misconfigured.length > 0)
      throw new Error(
        `nestjs-idempotency: invalid @Idempotent() options:\n  ${misconfigured.join('\n  ')}`,
      );
    this.rpc.acknowledgingHandlers(acknowledging);
    this.checkTransactional(transactional);
    if (problems.length > 0) {
      throw new Error(
        `nestjs-idempotency: @Idempotent() cannot protect these routes, because their response never passes through it:\n  ${problems.join('\n  ')}\nReturn the value instead (or use @Res({ passthrough: true })), mark the root mutation field, or remove @Idempotent().`,
      );
    }
  }

  /**
   * A serializer outside the idempotency interceptor (global, or listed before it) transforms the
   * response after it was stored: the stored body is the handler's object with every field the
   * serializer removes (`@Exclude()`), and a replay — a plain object, with no class to read
   * `@Exclude()` from — sends those fields. Checked once the app's global interceptors are known.
   */
  onApplicationBootstrap(): void {
    const global = [
      ...this.config.getGlobalInterceptors(),
      ...this.config.getGlobalRequestInterceptors().map((wrapper) => wrapper.metatype),
    ];
    const exposed = this.routes.filter(({ controller, handler }) => {
      const chain: unknown[] = [
        ...global,
        ...((Reflect.getMetadata(INTERCEPTORS_METADATA, controller) ?? []) as unknown[]),
        ...((Reflect.getMetadata(INTERCEPTORS_METADATA, handler) ?? []) as unknown[]),
      ];
      const ours = chain.findIndex((interceptor) => interceptor === IdempotencyInterceptor);
      // A serializer inside ours too stores the serialised body, which the outer one leaves as is.
      return chain.slice(0, ours).some(isSerializer) && !chain.slice(ours + 1).some(isSerializer);
    });
    if (exposed.length === 0) return;
    new Logger('Idempotency').warn(
      `ClassSerializerInterceptor wraps @Idempotent() on ${exposed.map(({ name }) => name).join(', ')}: responses are stored before it serialises them, ` +
        'so stored bodies keep the fields it removes (@Exclude()), and replays send those fields to the client. ' +
        'Serialise inside: put @UseInterceptors(ClassSerializerInterceptor) on the method above @Idempotent(), or return instanceToPlain(value) from the handler.',
    );
  }

  private checkTransactional(routes: string[]): void {
    if (routes.length === 0) return;
    const reason = this.store.transaction
      ? this.store.transactionsUnsupported?.()
      : 'the configured store has no transaction() method';
    if (reason) {
      throw new Error(
        `nestjs-idempotency: transactional routes (${routes.join(', ')}) cannot run on this store: ${reason}`,
      );
    }
  }
}

/** What each transport calls the payload a `keyFrom` path reads. */
const PATH_SOURCE: Readonly<Record<TransportType, string>> = {
  http: 'body',
  graphql: 'arg',
  rpc: 'payload',
};

/**
 * A `keyFrom` given as one source for every transport, of a kind this route's transport has not
 * (`{ body }` on a message handler): its calls would read no key.
 */
function keySourceProblem(
  options: ResolvedRouteOptions,
  transport: TransportType,
): string | undefined {
  const keyFrom = options.keyFrom;
  if (!keyFrom?.single || keyFrom.sources[transport]) return undefined;
  const kind = keyFrom.single;
  const own = PATH_SOURCE[transport];
  const described = {
    http: 'an HTTP route',
    graphql: 'a GraphQL resolver',
    rpc: 'a message handler',
  };
  return `keyFrom { ${kind} } reads nothing on ${described[transport]}: use { ${own}: '…' } or { header: '…' }, or give sources per transport ({ http, graphql, rpc })`;
}

function isSerializer(interceptor: unknown): boolean {
  return (
    interceptor === ClassSerializerInterceptor || interceptor instanceof ClassSerializerInterceptor
  );
}

function unsupportedReason(
  controller: Function,
  method: string,
  handler: Function,
): string | undefined {
  if (Reflect.getMetadata(SSE_METADATA, handler)) return 'it streams server-sent events (@Sse())';
  const args = (Reflect.getMetadata(ROUTE_ARGS_METADATA, controller, method) ?? {}) as object;
  const passthrough = Reflect.getMetadata(RESPONSE_PASSTHROUGH_METADATA, controller, method) as
    boolean | undefined;
  for (const key of Object.keys(args)) {
    // Nest keys a route's parameters `${RouteParamtypes}:${index}`.
    const type = Number(key.split(':')[0]) as RouteParamtypes;
    if (type === RouteParamtypes.NEXT) return 'it takes @Next()';
    if (type === RouteParamtypes.RESPONSE && !passthrough) {
      return 'it writes the response itself (@Res() without passthrough)';
    }
  }
  return undefined;
}
