import {
  Inject,
  Injectable,
  type CallHandler,
  type ExecutionContext,
  type NestInterceptor,
} from '@nestjs/common';
import { Reflector } from '@nestjs/core';
import { lastValueFrom, Observable, of } from 'rxjs';
import {
  RESOLVED_OPTIONS,
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
import type { ReplayedResponse } from '../interfaces/idempotency-options.interface.js';
import {
  IdempotencyRejectionError,
  rejection,
  type IdempotencyRejection,
} from '../errors/idempotency-rejection.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { describeScopeValue, scopeColumnValue } from '../utils/scope-value.js';
import { GraphQLTransport } from '../transports/graphql.transport.js';
import { boundedColumnValue } from '../transports/http-exchange.js';
import { HttpTransport } from '../transports/http.transport.js';
import type {
  IdempotencyTransport,
  OperationDescription,
} from '../transports/idempotency-transport.js';
import { routePlanOf, type RoutePlan, type ScopePlan } from './route-plan.js';
import {
  loadMicroservices,
  RpcTransport,
  type SettledMessage,
} from '../transports/rpc.transport.js';
import { quietLogger } from '../utils/quiet-logger.js';

/** Marks a call already handled, when `@Idempotent()` sits on both a controller and a method. */
const HANDLED = Symbol('nestjs-idempotency.handled');

/**
 * Settles the call with its transport (RPC: acknowledges the message), at most once: given how it
 * ended, or a function that tells it (only called when the transport settles calls).
 */
type Settle = (settled: SettledMessage | (() => SettledMessage)) => void;
const settlesNothing: Settle = () => undefined;
const DONE: SettledMessage = { kind: 'done', replayed: false };
const REPLAYED: SettledMessage = { kind: 'done', replayed: true };

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
  private readonly logger = quietLogger('Idempotency');
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
    const plan = this.planOf(context);
    if (plan.twice && alreadyHandled(context)) return next.handle();
    const { options } = plan;
    const on = plan.transports[transport.type]!;
    if (transport.type === 'rpc') await loadMicroservices();
    // Every call that gets here is settled once: by its decision, its handler's end, or a throw.
    const settle = this.settler(transport, context, options);
    try {
      if (options.skip) {
        // An async skip resolves to its answer (the promise itself would be truthy).
        const skipped = options.skip(context);
        if (skipped instanceof Promise ? await skipped : skipped)
          return this.unprotected(transport, next, options, settle);
      }
      const read = on.readKey(context);
      const reading = read instanceof Promise ? await read : read;
      if (reading.kind === 'invalid')
        throw new IdempotencyRejectionError(rejection('key-invalid', { detail: reading.reason }));
      if (reading.kind === 'absent') {
        if (options.required) throw new IdempotencyRejectionError(rejection('key-missing'));
        return this.unprotected(transport, next, options, settle);
      }
      const described = transport.describe(context, plan.defaultFingerprint);
      const operation = described instanceof Promise ? await described : described;
      if (on.scope.warnUnscoped) this.warnIfAuthenticated(context, operation.scopeSource);
      const scope = on.scope.resolve
        ? await this.scopeOf(context, on.scope, operation.scopeSource)
        : '';
      const id: RecordId = { scope, endpoint: operation.endpoint, key: reading.key };
      const fingerprint = fingerprintOf(plan, operation, context, scope);
      let decision: Decision;
      try {
        decision = await this.service.begin({
          id,
          fingerprint,
          lockTimeoutMs: options.lockTimeoutMs,
          ttlMs: options.ttlMs,
          concurrency: on.concurrency,
          waitTimeoutMs: options.waitTimeoutMs,
        });
      } catch (error) {
        throw this.storeUnavailable(id.key, error);
      }
      return this.act(transport, context, decision, fingerprint, next, plan, settle, id);
    } catch (error) {
      if (!(error instanceof IdempotencyRejectionError)) {
        // A `scope`, `keyFrom`, `skip` or `fingerprint` function that threw (a replayed stored
        // error is settled already).
        settle(() => this.settledAfterError(transport, error, options));
        throw error;
      }
      settle(settledBy(error.rejection));
      throw transport.reject(context, error.rejection);
    }
  }

  /** A call without idempotency (no key, or skipped): settled all the same (else left unacked). */
  private unprotected(
    transport: IdempotencyTransport,
    next: CallHandler,
    options: ResolvedRouteOptions,
    settle: Settle,
  ): Observable<unknown> {
    if (settle === settlesNothing) return next.handle();
    return this.runSettled(transport, next, options, settle);
  }

  /** The call's `Settle`: once, and an acknowledgement that throws is logged, not the call's end. */
  private settler(
    transport: IdempotencyTransport,
    context: ExecutionContext,
    options: ResolvedRouteOptions,
  ): Settle {
    if (!transport.settled) return settlesNothing;
    let settled = false;
    return (how) => {
      if (settled) return;
      settled = true;
      try {
        transport.settled!(context, typeof how === 'function' ? how() : how, options);
      } catch (error) {
        this.logger.error(
          `The acknowledgement of a message to ${context.getClass().name}.${context.getHandler().name} failed: ${(error as Error).message}. It stays unsettled until the broker delivers it again.`,
        );
      }
    };
  }

  /**
   * Runs the handler and settles the call by how it ended, then answers: like `execute`, one promise
   * chain that ends even when Nest stops listening first (when one of several handlers of an event
   * fails, Nest unsubscribes from the others).
   */
  private runSettled(
    transport: IdempotencyTransport,
    next: CallHandler,
    options: ResolvedRouteOptions,
    settle: Settle,
  ): Observable<unknown> {
    return new Observable<unknown>((subscriber) => {
      (transport.result
        ? transport.result(next.handle())
        : lastValueFrom(next.handle(), { defaultValue: undefined })
      ).then(
        (value) => {
          settle(DONE);
          (transport.answer ? transport.answer(value) : of(value)).subscribe(subscriber);
        },
        (error: unknown) => {
          settle(() => this.settledAfterError(transport, error, options));
          subscriber.error(error);
        },
      );
    });
  }

  private act(
    transport: IdempotencyTransport,
    context: ExecutionContext,
    decision: Decision,
    fingerprint: string,
    next: CallHandler,
    plan: RoutePlan,
    settle: Settle,
    id: RecordId,
  ): Observable<unknown> {
    const { options } = plan;
    switch (decision.action) {
      case 'execute':
        // One promise chain in one Observable (started on subscription, as `defer` would): the
        // lightest form for a path every first request takes.
        return new Observable<unknown>((subscriber) => {
          transport.prepare?.(context);
          this.service
            .execute(
              decision.lease,
              fingerprint,
              options,
              () =>
                transport.result
                  ? transport.result(next.handle())
                  : lastValueFrom(next.handle(), { defaultValue: undefined }),
              (outcome) => transport.capture(context, outcome, options, decision.lease.id),
            )
            .then(
              (value) => {
                settle(DONE);
                return value;
              },
              (error: unknown) => {
                const code =
                  error instanceof LeaseLostError
                    ? 'lease-lost'
                    : error instanceof UnstoredResultError
                      ? 'result-not-stored'
                      : error instanceof TransactionUnavailableError
                        ? 'store-unavailable'
                        : undefined;
                const refusal = code ? rejection(code) : undefined;
                // A stored error is done; a refusal or a released outcome is retried or dropped.
                settle(() =>
                  refusal ? settledBy(refusal) : this.settledAfterError(transport, error, options),
                );
                throw refusal ? transport.reject(context, refusal) : error;
              },
            )
            .then(
              (value) => {
                if (transport.answer) {
                  transport.answer(value).subscribe(subscriber);
                  return;
                }
                subscriber.next(value);
                subscriber.complete();
              },
              (error: unknown) => subscriber.error(error),
            );
        });
      case 'replay':
        settle(REPLAYED);
        if (options.onReplay) this.tellReplay(plan, context, id, decision.response);
        return transport.replay(context, decision.response, options);
      case 'mismatch':
        throw new IdempotencyRejectionError(rejection('key-reused'));
      case 'in-progress':
        throw new IdempotencyRejectionError(
          rejection('request-in-progress', { retryAfterSeconds: options.retryAfterSeconds }),
        );
      case 'unreadable':
        throw new IdempotencyRejectionError(rejection('response-unreadable'));
    }
  }

  /**
   * How a message whose handler (or scope resolver) threw ended: done (an answer the handler chose,
   * stored), dropped (a status a redelivery cannot change), or to be retried (a crash released the
   * key, so a redelivery runs the handler again): see `RpcTransport.settledAfterError`.
   */
  private settledAfterError(
    transport: IdempotencyTransport,
    error: unknown,
    options: ResolvedRouteOptions,
  ): SettledMessage {
    return (
      transport.settledAfterError?.(error, options) ?? {
        kind: 'retry',
        reason: 'the handler failed',
      }
    );
  }

  /** A store failure to decide, as a 503: the handler never runs without a claim. */
  private storeUnavailable(key: string, error: unknown): IdempotencyRejectionError {
    this.logger.error(
      `Idempotency store unavailable for key ${truncateKeyForLog(key)}: ${(error as Error).message}`,
    );
    return new IdempotencyRejectionError(rejection('store-unavailable'));
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
    plan: ScopePlan,
    scopeSource: unknown,
  ): Promise<string> {
    const returned: unknown = plan.resolve!(scopeSource);
    const resolved: unknown = returned instanceof Promise ? await returned : returned;
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

  /** Tells the route's `onReplay` of a replay: what it throws or rejects with is only logged. */
  private tellReplay(
    plan: RoutePlan,
    context: ExecutionContext,
    id: RecordId,
    stored: StoredResponse,
  ): void {
    const replayed: ReplayedResponse = {
      key: id.key,
      scope: id.scope,
      endpoint: id.endpoint,
      status: stored.status,
      isError: stored.isError,
      headers: stored.headers,
    };
    const failed = (error: unknown) =>
      this.logger.error(
        `The onReplay hook of ${plan.name} failed (the replay was sent as it was): ${(error as Error)?.message ?? String(error)}`,
      );
    try {
      const returned: unknown = plan.options.onReplay!(context, replayed);
      if (returned instanceof Promise) returned.catch(failed);
    } catch (error) {
      failed(error);
    }
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

  /**
   * Each handler's plan for the controller that last called it: one lookup per call, as almost
   * every handler has one controller (one inherited by several finds theirs in `routePlanOf`).
   */
  private readonly plans = new WeakMap<Function, { controller: Function; plan: RoutePlan }>();

  /** The route's compiled plan (see `RoutePlan`). */
  private planOf(context: ExecutionContext): RoutePlan {
    const handler = context.getHandler();
    const controller = context.getClass();
    const known = this.plans.get(handler);
    if (known?.controller === controller) return known.plan;
    const plan = routePlanOf(
      this.moduleOptions,
      this.transports,
      controller,
      handler,
      isIdempotencyInterceptor,
    );
    this.plans.set(handler, { controller, plan });
    return plan;
  }
}

/** Whether an entry of `@UseInterceptors()` is this interceptor (its class or an instance). */
export function isIdempotencyInterceptor(interceptor: unknown): boolean {
  return interceptor === IdempotencyInterceptor || interceptor instanceof IdempotencyInterceptor;
}

/** A refused message: to be delivered again when a retry may succeed (Retry-After), else dropped. */
function settledBy(refusal: IdempotencyRejection): SettledMessage {
  return refusal.retryAfterSeconds === undefined
    ? { kind: 'drop', reason: refusal.code }
    : { kind: 'retry', reason: refusal.code };
}

/**
 * The call's fingerprint. A default one that cannot be computed (a body nested too deep) is the
 * request's fault: 400 `body-unreadable`; a route's own `fingerprint` function that throws is the
 * app's, and its error is the call's answer.
 */
function fingerprintOf(
  plan: RoutePlan,
  operation: OperationDescription,
  context: ExecutionContext,
  scope: string,
): string {
  if (!plan.defaultFingerprint) return plan.fingerprintOf(operation, context, scope);
  try {
    return plan.fingerprintOf(operation, context, scope);
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
