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
import { fingerprintOfValue, fingerprintRequest, MAX_JSON_DEPTH } from '../utils/fingerprint.js';
import { quietLogger } from '../utils/quiet-logger.js';
import { IdempotencyRejectionError, rejection } from '../errors/idempotency-rejection.js';

const logger = quietLogger('Idempotency');

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
  const name = `${controller.name}.${handler.name}`;
  const resolved = resolveRouteOptionsFor(
    moduleOptions,
    controllerRouteOptions(controller),
    Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, handler) as IdempotencyRouteOptions | undefined,
  );
  const options: ResolvedRouteOptions = {
    ...resolved,
    shouldStore: guardedStorePolicy(
      resolved.shouldStore,
      `${resolved.storesAnyError ? 'storeIf' : 'storeStatuses'} of ${name}`,
    ),
  };
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
    name,
    twice: listed(controller) + listed(handler) > 1,
    defaultFingerprint: fingerprint === undefined,
    fingerprintOf:
      fingerprint === undefined
        ? (operation) => fingerprintRequest(operation.fingerprint!)
        : fingerprint === false
          ? (operation, _context, scope) => fingerprintOfValue(operation.endpoint, scope)
          : (operation, context, scope) => {
              // What the function throws is the app's; a value too deep to hash is the request's.
              const value = fingerprint(operation.payload, context);
              try {
                return fingerprintOfValue(operation.endpoint, scope, value);
              } catch (error) {
                if (!(error instanceof RangeError) || isCyclic(value)) throw error;
                throw new IdempotencyRejectionError(rejection('body-unreadable'));
              }
            },
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

/**
 * The route's `storeIf` (or `storeStatuses` predicate), guarded: one that throws is logged and
 * its outcome is not stored (the key is released, as for a response too large to store), rather
 * than leaving the key claimed until `lockTimeout` and the caller with a 500.
 */
function guardedStorePolicy(
  shouldStore: ResolvedRouteOptions['shouldStore'],
  what: string,
): ResolvedRouteOptions['shouldStore'] {
  return (status, error) => {
    try {
      return shouldStore(status, error);
    } catch (thrown) {
      logger.error(
        `The ${what} threw (${(thrown as Error)?.message ?? String(thrown)}): the outcome (status ${status}) was not stored and its key was released.`,
      );
      return false;
    }
  };
}

/**
 * Whether a value refers to itself: a `fingerprint` function's bug (a 500), not a body too deep
 * (400 `body-unreadable`). Only asked once hashing the value has failed.
 */
function isCyclic(value: unknown, ancestors = new Set<object>()): boolean {
  if (typeof value !== 'object' || value === null) return false;
  if (ancestors.has(value)) return true;
  // Deeper than hashing goes, and bounded so a body nested 50 000 levels overflows nothing here.
  if (ancestors.size > 2 * MAX_JSON_DEPTH) return false;
  ancestors.add(value);
  for (const member of Object.values(value)) if (isCyclic(member, ancestors)) return true;
  ancestors.delete(value);
  return false;
}
