import {
  Inject,
  Injectable,
  Logger,
  type CallHandler,
  type ExecutionContext,
  type NestInterceptor,
} from '@nestjs/common';
import { Reflector } from '@nestjs/core';
import { lastValueFrom, Observable } from 'rxjs';
import { INTERCEPTORS_METADATA } from '@nestjs/common/constants.js';
import {
  IDEMPOTENT_ROUTE_OPTIONS,
  IN_PROGRESS_RETRY_AFTER_SECONDS,
} from '../idempotency.constants.js';
import {
  RESOLVED_OPTIONS,
  resolveRouteOptionsFor,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import {
  IdempotencyService,
  LeaseLostError,
  UnstoredResultError,
  TransactionUnavailableError,
  type Decision,
} from '../idempotency.service.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import {
  IdempotencyRejectionError,
  rejection,
  type IdempotencyRejection,
} from '../errors/idempotency-rejection.js';
import type { RecordId } from '../storage/idempotency-store.interface.js';
import { fingerprintRequest } from '../utils/fingerprint.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { describeScopeValue, scopeColumnValue } from '../utils/scope-value.js';
import { GraphQLTransport } from '../transports/graphql.transport.js';
import { boundedColumnValue } from '../transports/http-exchange.js';
import { HttpTransport } from '../transports/http.transport.js';
import type {
  IdempotencyTransport,
  OperationDescription,
} from '../transports/idempotency-transport.js';
import {
  loadMicroservices,
  RpcTransport,
  type SettledMessage,
} from '../transports/rpc.transport.js';

/**
 * A route's resolved options, and whether the interceptor is listed on it more than once. Per
 * controller and handler: controllers that inherit a handler from one base class share its
 * function, not its options (each has its own class-level `@Idempotent()`).
 */
interface Route {
  readonly options: ResolvedRouteOptions;
  readonly twice: boolean;
}

/** Marks a call already handled, when `@Idempotent()` sits on both a controller and a method. */
const HANDLED = Symbol('nestjs-idempotency.handled');

/** Handlers already warned about an authenticated caller without a scope. */
const warnedUnscoped = new WeakSet<Function>();

/**
 * Drives one plan for every transport: read the key, ask the service for a decision, then run the
 * handler and store its result, replay a stored result, or reject. What depends on the transport
 * (where the key is, what identifies the operation, how results are captured, replayed and
 * rejections rendered) is its adapter's (see `IdempotencyTransport`).
 */
@Injectable()
export class IdempotencyInterceptor implements NestInterceptor {
  private readonly logger = new Logger('Idempotency');
  private readonly routes = new WeakMap<Function, WeakMap<Function, Route>>();
  private readonly transports: Readonly<Record<string, IdempotencyTransport>>;

  constructor(
    private readonly reflector: Reflector,
    private readonly service: IdempotencyService,
    http: HttpTransport,
    graphql: GraphQLTransport,
    rpc: RpcTransport,
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
  ) {
    this.transports = { http, graphql, rpc };
  }

  async intercept(context: ExecutionContext, next: CallHandler): Promise<Observable<unknown>> {
    const transport = this.transports[context.getType()];
    if (!transport || !transport.applies(context)) return next.handle();
    const { options, twice } = this.routeOf(context);
    if (twice && alreadyHandled(context)) return next.handle();
    if (transport.type === 'rpc') await loadMicroservices();
    try {
      const reading = transport.readKey(context);
      if (reading.kind === 'invalid')
        throw new IdempotencyRejectionError(rejection('key-invalid', { detail: reading.reason }));
      if (reading.kind === 'absent') {
        if (options.required) throw new IdempotencyRejectionError(rejection('key-missing'));
        return next.handle();
      }
      const operation = await transport.describe(context);
      if (!options.scoped) this.warnIfAuthenticated(context, operation.scopeSource);
      const id: RecordId = {
        scope: await this.scopeOf(context, options, operation.scopeSource),
        endpoint: operation.endpoint,
        key: reading.key,
      };
      const fingerprint = fingerprintOf(operation);
      const decision = await this.decide(id.key, () =>
        this.service.begin({
          id,
          fingerprint,
          lockTimeoutMs: options.lockTimeoutMs,
          concurrency: options.concurrency ?? transport.defaultConcurrency,
          waitTimeoutMs: options.waitTimeoutMs,
        }),
      );
      return this.act(transport, context, decision, fingerprint, next, options);
    } catch (error) {
      if (!(error instanceof IdempotencyRejectionError)) throw error;
      transport.settled?.(context, settledBy(error.rejection), options);
      throw transport.reject(context, error.rejection);
    }
  }

  private act(
    transport: IdempotencyTransport,
    context: ExecutionContext,
    decision: Decision,
    fingerprint: string,
    next: CallHandler,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    switch (decision.action) {
      case 'execute':
        // One promise chain in one Observable (started on subscription, as `defer` would): the
        // lightest form for a path every first request takes.
        return new Observable<unknown>((subscriber) => {
          this.service
            .execute(
              decision.lease,
              fingerprint,
              options,
              () => lastValueFrom(next.handle(), { defaultValue: undefined }),
              (outcome) => transport.capture(context, outcome, options, decision.lease.id),
            )
            .then((value) => {
              transport.settled?.(context, { kind: 'done', replayed: false }, options);
              return value;
            })
            .catch(async (error: unknown) => {
              const code =
                error instanceof LeaseLostError
                  ? 'lease-lost'
                  : error instanceof UnstoredResultError
                    ? 'result-not-stored'
                    : error instanceof TransactionUnavailableError
                      ? 'store-unavailable'
                      : undefined;
              const refusal = code ? rejection(code) : undefined;
              if (transport.settled) {
                transport.settled(
                  context,
                  await this.settledAfterFailure(
                    transport,
                    context,
                    error,
                    refusal,
                    options,
                    decision.lease.id,
                  ),
                  options,
                );
              }
              throw refusal ? transport.reject(context, refusal) : error;
            })
            .then(
              (value) => {
                subscriber.next(value);
                subscriber.complete();
              },
              (error: unknown) => subscriber.error(error),
            );
        });
      case 'replay':
        transport.settled?.(context, { kind: 'done', replayed: true }, options);
        return transport.replay(context, decision.response, options);
      case 'mismatch':
        throw new IdempotencyRejectionError(rejection('key-reused'));
      case 'in-progress':
        throw new IdempotencyRejectionError(
          rejection('request-in-progress', {
            retryAfterSeconds: IN_PROGRESS_RETRY_AFTER_SECONDS,
          }),
        );
      case 'unreadable':
        throw new IdempotencyRejectionError(rejection('response-unreadable'));
    }
  }

  /**
   * How a message whose execution failed ended: refused (lease lost, result not stored), done (a
   * stored error: an HttpException or RpcException the handler chose is its result), or to be
   * retried (a crash released the key, so a redelivery runs the handler again).
   */
  private async settledAfterFailure(
    transport: IdempotencyTransport,
    context: ExecutionContext,
    error: unknown,
    refusal: IdempotencyRejection | undefined,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): Promise<SettledMessage> {
    if (refusal) return settledBy(refusal);
    const stored = (await transport.capture(context, { ok: false, error }, options, id)) !== null;
    return stored
      ? { kind: 'done', replayed: false }
      : { kind: 'retry', reason: 'the handler failed' };
  }

  /** Decides, turning a store failure into a 503: the handler never runs without a claim. */
  private async decide(key: string, begin: () => Promise<Decision>): Promise<Decision> {
    try {
      return await begin();
    } catch (error) {
      this.logger.error(
        `Idempotency store unavailable for key ${truncateKeyForLog(key)}: ${(error as Error).message}`,
      );
      throw new IdempotencyRejectionError(rejection('store-unavailable'));
    }
  }

  /** Routes already warned about (once per route and app): an empty scope, a value refused. */
  private readonly scopeWarnings = {
    empty: new WeakSet<Function>(),
    invalid: new WeakSet<Function>(),
  };

  /**
   * The record's scope: what the route's resolver returns, as a string (see `scopeColumnValue`).
   * A value that cannot be an identity is refused (`scope-invalid`) and logged; no identity for an
   * authenticated caller is warned about. Once per route each. What the resolver throws (an
   * `UnauthorizedException`, say) is the request's answer.
   */
  private async scopeOf(
    context: ExecutionContext,
    options: ResolvedRouteOptions,
    scopeSource: unknown,
  ): Promise<string> {
    const resolved: unknown = await options.scope(scopeSource);
    const scope = scopeColumnValue(resolved);
    const handler = context.getHandler();
    const route = () => `${context.getClass().name}.${handler.name}`;
    if (scope === undefined) {
      if (!this.scopeWarnings.invalid.has(handler)) {
        this.scopeWarnings.invalid.add(handler);
        this.logger.error(
          `The \`scope\` resolver of ${route()} returned ${describeScopeValue(resolved)}, which is no caller identity: its requests are refused (500 scope-invalid). ` +
            'Return a string, a number or a bigint (e.g. request.user.id), or undefined for a caller without identity.',
        );
      }
      throw new IdempotencyRejectionError(rejection('scope-invalid'));
    }
    if (
      scope === '' &&
      options.scoped &&
      (scopeSource as { user?: unknown } | undefined)?.user != null &&
      !this.scopeWarnings.empty.has(handler)
    ) {
      this.scopeWarnings.empty.add(handler);
      this.logger.warn(
        `The \`scope\` resolver of ${route()} returned no identity for an authenticated caller (request.user is set): such callers share the empty scope, ` +
          "so one of them who sends another's key receives that caller's stored response. Check that it reads the field your authentication sets (request.user.id, request.user.userId, request.user.sub).",
      );
    }
    return boundedColumnValue(scope);
  }

  /**
   * An authenticated caller (`request.user`, as Passport sets it) on a route whose keys are shared
   * by every caller: one user's key could replay another user's response. Warned once per route.
   */
  private warnIfAuthenticated(context: ExecutionContext, scopeSource: unknown): void {
    if ((scopeSource as { user?: unknown } | undefined)?.user == null) return;
    const handler = context.getHandler();
    if (warnedUnscoped.has(handler)) return;
    warnedUnscoped.add(handler);
    this.logger.warn(
      `${context.getClass().name}.${handler.name} is called by an authenticated user (request.user), but its keys have no scope: every caller shares one key space, ` +
        "so a user who sends another user's key receives that user's stored response. Set `scope`, e.g. IdempotencyModule.forRoot({ scope: (request) => request.user.id }).",
    );
  }

  /** The route's options, and whether this interceptor is on it twice (class and method). */
  private routeOf(context: ExecutionContext): Route {
    const controller = context.getClass();
    const handler = context.getHandler();
    let routes = this.routes.get(controller);
    if (!routes) this.routes.set(controller, (routes = new WeakMap()));
    let route = routes.get(handler);
    if (!route) {
      const options = (target: Function) =>
        this.reflector.get<IdempotencyRouteOptions | undefined>(IDEMPOTENT_ROUTE_OPTIONS, target);
      const listed = (target: object) =>
        (
          (Reflect.getMetadata(INTERCEPTORS_METADATA, target) as unknown[] | undefined) ?? []
        ).filter(
          (interceptor) =>
            interceptor === IdempotencyInterceptor || interceptor instanceof IdempotencyInterceptor,
        ).length;
      route = {
        options: resolveRouteOptionsFor(this.moduleOptions, options(controller), options(handler)),
        twice: listed(controller) + listed(handler) > 1,
      };
      routes.set(handler, route);
    }
    return route;
  }
}

/** A refused message: to be delivered again when a retry may succeed (Retry-After), else dropped. */
function settledBy(refusal: IdempotencyRejection): SettledMessage {
  return refusal.retryAfterSeconds === undefined
    ? { kind: 'drop', reason: refusal.code }
    : { kind: 'retry', reason: refusal.code };
}

function fingerprintOf(operation: OperationDescription): string {
  try {
    return fingerprintRequest(operation.fingerprint);
  } catch {
    throw new IdempotencyRejectionError(rejection('body-unreadable'));
  }
}

/**
 * Marks the call, so a second `@Idempotent()` interceptor on it (class and method) passes it
 * through. On HTTP the request object, elsewhere the call's argument list (one per call).
 */
function alreadyHandled(context: ExecutionContext): boolean {
  const marker = (
    context.getType() === 'http' ? context.switchToHttp().getRequest() : context.getArgs()
  ) as Record<symbol, boolean>;
  if (marker[HANDLED]) return true;
  Object.defineProperty(marker, HANDLED, { value: true });
  return false;
}
