import {
  DEFAULTS,
  IDEMPOTENT_ROUTE_OPTIONS,
  RELEASING_CLIENT_STATUSES,
} from './idempotency.constants.js';
import type { ConcurrencyMode, MessageAcknowledgement } from './core/types.js';
import type {
  IdempotencyModuleOptions,
  IdempotencyRouteOptions,
  ScopeResolver,
  StoreStatusPolicy,
} from './interfaces/idempotency-options.interface.js';
import { toMilliseconds } from './utils/duration.js';
import { ResponseSealer } from './security/response-sealer.js';
import { ReplayCache } from './replay-cache.js';

/** Internal token: the module's options with defaults applied and durations in milliseconds. */
export const RESOLVED_OPTIONS = Symbol('IdempotencyResolvedOptions');

/** What a route runs with: module options overlaid by its `@Idempotent()` options. */
export interface ResolvedRouteOptions {
  readonly ttlMs: number;
  readonly lockTimeoutMs: number;
  /** 0: the claim is not renewed. */
  readonly lockRenewalLimitMs: number;
  readonly transactional: boolean;
  readonly required: boolean;
  /** Unset: the transport's default (HTTP and GraphQL reject, messages wait). */
  readonly concurrency: ConcurrencyMode | undefined;
  readonly waitTimeoutMs: number;
  readonly scope: ScopeResolver;
  /** A scope resolver was configured (module or route); unset, every caller shares one scope. */
  readonly scoped: boolean;
  readonly shouldStore: (status: number) => boolean;
  readonly replayStatus: number | undefined;
  readonly acknowledge: MessageAcknowledgement | undefined;
}

export interface ResolvedModuleOptions extends ResolvedRouteOptions {
  /** 0: no purge job. */
  readonly purgeIntervalMs: number;
  readonly purgeBatchSize: number;
  readonly waitPollIntervalMs: number;
  readonly waitNotifications: boolean;
  readonly maxResponseBytes: number;
  readonly storeTimeoutMs: number;
  readonly runMigrations: boolean;
  readonly messageKeyField: string;
  /** Seals and opens stored responses, when `encryption` is set. */
  readonly sealer: ResponseSealer | undefined;
  /** Completed records read in this process, unless `replayCache: false`. */
  readonly replayCache: ReplayCache | undefined;
}

const everyoneInOneScope: ScopeResolver = () => '';

/** By default: keep what the handler decided, release what the client is expected to correct. */
const storeDecidedOutcomes = (status: number) =>
  status < 500 && !RELEASING_CLIENT_STATUSES.includes(status);

/** Defaults for everything that is not a duration (those have no sensible zero). */
const UNSET_ROUTE_OPTIONS: ResolvedRouteOptions = {
  ttlMs: 0,
  lockTimeoutMs: 0,
  lockRenewalLimitMs: 0,
  transactional: DEFAULTS.transactional,
  required: DEFAULTS.required,
  concurrency: undefined,
  waitTimeoutMs: 0,
  scope: everyoneInOneScope,
  scoped: false,
  shouldStore: storeDecidedOutcomes,
  replayStatus: undefined,
  acknowledge: undefined,
};

/** Applies defaults and validates, so a bad option fails at startup rather than per request. */
export function resolveModuleOptions(options: IdempotencyModuleOptions): ResolvedModuleOptions {
  const route = resolveRouteOptions(UNSET_ROUTE_OPTIONS, {
    ttl: DEFAULTS.ttl,
    lockTimeout: DEFAULTS.lockTimeout,
    lockRenewalLimit: DEFAULTS.lockRenewalLimit,
    waitTimeout: DEFAULTS.waitTimeout,
    ...withoutUndefined(options),
  });
  const purgeInterval = options.purgeInterval ?? DEFAULTS.purgeInterval;
  const purgeBatchSize = options.purgeBatchSize ?? DEFAULTS.purgeBatchSize;
  if (!Number.isInteger(purgeBatchSize) || purgeBatchSize < 1) {
    throw new TypeError('nestjs-idempotency: purgeBatchSize must be a positive integer');
  }
  const maxResponseBytes = options.maxResponseBytes ?? DEFAULTS.maxResponseBytes;
  if (!(maxResponseBytes >= 0)) {
    throw new TypeError('nestjs-idempotency: maxResponseBytes must be a non-negative number');
  }
  return {
    ...route,
    purgeIntervalMs: purgeInterval === false ? 0 : toMilliseconds(purgeInterval, 'purgeInterval'),
    purgeBatchSize,
    waitPollIntervalMs: Math.max(
      1,
      toMilliseconds(options.waitPollInterval ?? DEFAULTS.waitPollInterval, 'waitPollInterval'),
    ),
    waitNotifications: options.waitNotifications ?? DEFAULTS.waitNotifications,
    maxResponseBytes,
    storeTimeoutMs: Math.max(
      1,
      toMilliseconds(options.storeTimeout ?? DEFAULTS.storeTimeout, 'storeTimeout'),
    ),
    runMigrations: options.runMigrations ?? DEFAULTS.runMigrations,
    messageKeyField: options.messageKeyField ?? DEFAULTS.messageKeyField,
    sealer: options.encryption ? new ResponseSealer(options.encryption) : undefined,
    replayCache: options.replayCache === false ? undefined : new ReplayCache(options.replayCache),
  };
}

/**
 * A route's options: its method's `@Idempotent()` options over its controller's over the module's,
 * field by field (a method that sets only `required` keeps its controller's `ttl` and `scope`).
 * Unset (`undefined`) where the method or controller has no `@Idempotent()`.
 */
export function resolveRouteOptionsFor(
  module: ResolvedRouteOptions,
  controller: IdempotencyRouteOptions | undefined,
  handler: IdempotencyRouteOptions | undefined,
): ResolvedRouteOptions {
  return resolveRouteOptions(resolveRouteOptions(module, controller ?? {}), handler ?? {});
}

/**
 * A controller's `@Idempotent()` options, merged down its class chain field by field: a subclass's
 * over its base class's (a subclass that sets only `ttl` keeps its base's `scope`). Unset where
 * no class of the chain has `@Idempotent()`.
 */
export function controllerRouteOptions(controller: Function): IdempotencyRouteOptions | undefined {
  let merged: IdempotencyRouteOptions | undefined;
  for (
    let type: unknown = controller;
    typeof type === 'function' && type !== Function.prototype;
    type = Object.getPrototypeOf(type)
  ) {
    const own = Reflect.getOwnMetadata(IDEMPOTENT_ROUTE_OPTIONS, type) as
      IdempotencyRouteOptions | undefined;
    if (own) merged = merged ? { ...withoutUndefined(own), ...withoutUndefined(merged) } : own;
  }
  return merged;
}

/** Overlays a route's `@Idempotent()` options on resolved ones. */
export function resolveRouteOptions(
  base: ResolvedRouteOptions,
  route: IdempotencyRouteOptions,
): ResolvedRouteOptions {
  const concurrency = route.concurrency ?? base.concurrency;
  if (concurrency !== undefined && concurrency !== 'reject' && concurrency !== 'wait') {
    throw new TypeError(
      `nestjs-idempotency: concurrency must be 'reject' or 'wait'; got ${JSON.stringify(concurrency)}`,
    );
  }
  const replayStatus = route.replayStatus ?? base.replayStatus;
  if (
    replayStatus !== undefined &&
    !(Number.isInteger(replayStatus) && replayStatus >= 200 && replayStatus < 300)
  ) {
    throw new TypeError('nestjs-idempotency: replayStatus must be a 2xx status code');
  }
  return {
    ttlMs: route.ttl === undefined ? base.ttlMs : toMilliseconds(route.ttl, 'ttl'),
    lockTimeoutMs:
      route.lockTimeout === undefined
        ? base.lockTimeoutMs
        : toMilliseconds(route.lockTimeout, 'lockTimeout'),
    lockRenewalLimitMs:
      route.lockRenewalLimit === undefined
        ? base.lockRenewalLimitMs
        : toMilliseconds(route.lockRenewalLimit, 'lockRenewalLimit'),
    transactional: route.transactional ?? base.transactional,
    required: route.required ?? base.required,
    concurrency,
    waitTimeoutMs:
      route.waitTimeout === undefined
        ? base.waitTimeoutMs
        : toMilliseconds(route.waitTimeout, 'waitTimeout'),
    scope: route.scope ?? base.scope,
    scoped: route.scope !== undefined || base.scoped,
    shouldStore: route.storeStatuses ? toPredicate(route.storeStatuses) : base.shouldStore,
    replayStatus,
    acknowledge: route.acknowledge ?? base.acknowledge,
  };
}

function toPredicate(policy: StoreStatusPolicy): (status: number) => boolean {
  if (typeof policy === 'function') return policy;
  const statuses = new Set(policy);
  return (status) => statuses.has(status);
}

function withoutUndefined<T extends object>(options: T): Partial<T> {
  return Object.fromEntries(
    Object.entries(options).filter(([, value]) => value !== undefined),
  ) as Partial<T>;
}

/** Throws on a malformed route option, at decoration time (so when the app's code is loaded). */
export function validateRouteOptions(route: IdempotencyRouteOptions): void {
  resolveRouteOptions(UNSET_ROUTE_OPTIONS, route);
}
