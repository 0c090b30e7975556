import type { ExecutionContext } from '@nestjs/common';
import { INTERCEPTORS_METADATA } from '@nestjs/common/constants.js';
import { IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import {
  controllerRouteOptions,
  resolveRouteOptionsFor,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
  type TransportType,
} from '../idempotency.options.js';
import type {
  ConcurrencyMode,
  IdempotencyRouteOptions,
  ScopeResolver,
} from '../interfaces/idempotency-options.interface.js';
import type {
  IdempotencyTransport,
  KeyReader,
  OperationDescription,
} from '../transports/idempotency-transport.js';
import { fingerprintOfValue, fingerprintRequest } from '../utils/fingerprint.js';

/** How a route finds its calls' scope on one transport. */
export interface ScopePlan {
  /** The resolver; unset: the empty scope (one namespace for every caller). */
  readonly resolve: ScopeResolver | undefined;
  /** No scope, and not on purpose (`scope: false`): an authenticated caller is warned about. */
  readonly warnUnscoped: boolean;
}

/** What a route does on one transport, decided once. */
export interface TransportPlan {
  readonly transport: IdempotencyTransport;
  readonly readKey: KeyReader;
  readonly scope: ScopePlan;
  readonly concurrency: ConcurrencyMode;
}

/**
 * A route's compiled plan, built once per controller and handler (at startup by
 * `IdempotentRoutesCheck`, else on its first call): options merged and checked, each transport's
 * key reader, scope and concurrency chosen, the fingerprint function bound.
 */
export interface RoutePlan {
  readonly options: ResolvedRouteOptions;
  /** `Class.method`, for log lines. */
  readonly name: string;
  /** The interceptor is listed on the route more than once (class and method). */
  readonly twice: boolean;
  /** The transport must describe the default fingerprint's input (no `fingerprint` option). */
  readonly defaultFingerprint: boolean;
  /** The call's fingerprint, given its description, context and scope. */
  readonly fingerprintOf: (
    operation: OperationDescription,
    context: ExecutionContext,
    scope: string,
  ) => string;
  readonly transports: Readonly<Partial<Record<string, TransportPlan>>>;
}

/** Plans per module instance (its resolved options), controller and handler. */
const plans = new WeakMap<object, WeakMap<Function, WeakMap<Function, RoutePlan>>>();

/**
 * The route's plan, compiled on first use and kept (per module, controller and handler:
 * controllers that inherit one handler have their own class-level options).
 *
 * @param isOurs whether an entry of `@UseInterceptors()` is the idempotency interceptor
 */
export function routePlanOf(
  moduleOptions: ResolvedModuleOptions,
  transports: Readonly<Record<string, IdempotencyTransport>>,
  controller: Function,
  handler: Function,
  isOurs: (interceptor: unknown) => boolean,
): RoutePlan {
  let byController = plans.get(moduleOptions);
  if (!byController) plans.set(moduleOptions, (byController = new WeakMap()));
  let byHandler = byController.get(controller);
  if (!byHandler) byController.set(controller, (byHandler = new WeakMap()));
  let plan = byHandler.get(handler);
  if (!plan) {
    plan = compileRoutePlan(moduleOptions, transports, controller, handler, isOurs);
    byHandler.set(handler, plan);
  }
  return plan;
}

function compileRoutePlan(
  moduleOptions: ResolvedModuleOptions,
  transports: Readonly<Record<string, IdempotencyTransport>>,
  controller: Function,
  handler: Function,
  isOurs: (interceptor: unknown) => boolean,
): RoutePlan {
  const options = resolveRouteOptionsFor(
    moduleOptions,
    controllerRouteOptions(controller),
    Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, handler) as IdempotencyRouteOptions | undefined,
  );
  const listed = (target: object) =>
    ((Reflect.getMetadata(INTERCEPTORS_METADATA, target) as unknown[] | undefined) ?? []).filter(
      isOurs,
    ).length;
  const compiled: Partial<Record<string, TransportPlan>> = {};
  for (const [type, transport] of Object.entries(transports)) {
    compiled[type] = {
      transport,
      readKey: transport.keyReader(options.keyFrom?.sources[type as TransportType]),
      scope: scopePlan(options, type as TransportType),
      concurrency: options.concurrency ?? transport.defaultConcurrency,
    };
  }
  const { fingerprint } = options;
  return {
    options,
    name: `${controller.name}.${handler.name}`,
    twice: listed(controller) + listed(handler) > 1,
    defaultFingerprint: fingerprint === undefined,
    fingerprintOf:
      fingerprint === undefined
        ? (operation) => fingerprintRequest(operation.fingerprint!)
        : fingerprint === false
          ? (operation, _context, scope) => fingerprintOfValue(operation.endpoint, scope)
          : (operation, context, scope) =>
              fingerprintOfValue(
                operation.endpoint,
                scope,
                fingerprint(operation.payload, context),
              ),
    transports: compiled,
  };
}

function scopePlan(options: ResolvedRouteOptions, type: TransportType): ScopePlan {
  const { scope } = options;
  if (scope === undefined) return { resolve: undefined, warnUnscoped: true };
  if (scope === false) return { resolve: undefined, warnUnscoped: false };
  if (typeof scope === 'function') return { resolve: scope, warnUnscoped: false };
  const own = scope[type];
  if (own === false) return { resolve: undefined, warnUnscoped: false };
  if (own === undefined) return { resolve: undefined, warnUnscoped: true };
  return { resolve: own as ScopeResolver, warnUnscoped: false };
}
