import type { ExecutionContext } from '@nestjs/common';
import {
  DEFAULTS,
  IDEMPOTENT_ROUTE_OPTIONS,
  IN_PROGRESS_RETRY_AFTER_SECONDS,
  RELEASING_CLIENT_STATUSES,
} from './idempotency.constants.js';
import type { ConcurrencyMode, MessageAcknowledgement } from './core/types.js';
import type {
  FingerprintOption,
  IdempotencyModuleOptions,
  IdempotencyRouteOptions,
  KeySource,
  ReplayedResponse,
  ScopeOption,
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
  /** The `scope` option as set (whole, not merged field by field); unset: one scope for all. */
  readonly scope: ScopeOption | undefined;
  /**
   * Whether an outcome is stored: `storeIf`, else `storeStatuses` (which ignores `error`). `error`
   * is `undefined` for a returned value.
   */
  readonly shouldStore: (status: number, error?: unknown) => boolean;
  /** `storeIf` decides: an error that is not an answer of its transport may be stored. */
  readonly storesAnyError: boolean;
  readonly replayStatus: number | undefined;
  readonly acknowledge: MessageAcknowledgement | undefined;
  /** Unset: each transport's default. */
  readonly keyFrom: KeySourcesOf | undefined;
  /** Unset: each transport's default fingerprint. */
  readonly fingerprint: FingerprintOption | undefined;
  readonly skip: ((context: ExecutionContext) => boolean | Promise<boolean>) | undefined;
  /** Lower-cased names; unset: every header the handler set (see `storableHeaders`). */
  readonly replayHeaders: ReadonlySet<string> | undefined;
  readonly retryAfterSeconds: number;
  readonly onReplay:
    ((context: ExecutionContext, stored: ReplayedResponse) => void | Promise<void>) | undefined;
}

/** Transports whose calls `@Idempotent()` serves, as `ExecutionContext.getType()` names them. */
export type TransportType = 'http' | 'graphql' | 'rpc';

/** A route's `keyFrom`, checked: its source per transport (a transport without one: its default). */
export interface KeySourcesOf {
  readonly sources: Readonly<Partial<Record<TransportType, KeySource>>>;
  /** The kind of the one source given for every transport (`'body'`); unset: given per transport. */
  readonly single: 'header' | 'body' | 'arg' | 'payload' | 'function' | undefined;
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
  scope: undefined,
  shouldStore: storeDecidedOutcomes,
  storesAnyError: false,
  replayStatus: undefined,
  acknowledge: undefined,
  keyFrom: undefined,
  fingerprint: undefined,
  skip: undefined,
  replayHeaders: undefined,
  retryAfterSeconds: IN_PROGRESS_RETRY_AFTER_SECONDS,
  onReplay: undefined,
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
    if (own)
      merged = merged
        ? { ...withoutUndefined(below(own, merged)), ...withoutUndefined(merged) }
        : own;
  }
  return merged;
}

/**
 * A base class's options under a subclass's: `storeIf` and `storeStatuses` decide one thing, so a
 * subclass that sets either replaces the base's (one per level, as on the method and the module).
 */
function below(
  base: IdempotencyRouteOptions,
  over: IdempotencyRouteOptions,
): IdempotencyRouteOptions {
  if (over.storeIf === undefined && over.storeStatuses === undefined) return base;
  const { storeIf: _storeIf, storeStatuses: _storeStatuses, ...rest } = base;
  return rest;
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
  if (route.storeIf !== undefined && route.storeStatuses !== undefined) {
    throw new TypeError(
      'nestjs-idempotency: set storeIf or storeStatuses, not both (storeIf receives the status too)',
    );
  }
  expectFunction(route.storeIf, 'storeIf', '(status, error) => boolean');
  expectFunction(route.skip, 'skip', '(context) => boolean');
  expectFunction(route.onReplay, 'onReplay', '(context, stored) => void');
  const shouldStore = route.storeIf
    ? route.storeIf
    : route.storeStatuses
      ? toPredicate(route.storeStatuses)
      : base.shouldStore;
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
    scope: route.scope === undefined ? base.scope : scopeOption(route.scope),
    shouldStore,
    storesAnyError:
      route.storeIf !== undefined || (route.storeStatuses === undefined && base.storesAnyError),
    replayStatus,
    acknowledge: route.acknowledge ?? base.acknowledge,
    keyFrom: route.keyFrom === undefined ? base.keyFrom : keySourcesOf(route.keyFrom),
    fingerprint: route.fingerprint === undefined ? base.fingerprint : fingerprintOption(route),
    skip: route.skip ?? base.skip,
    replayHeaders:
      route.replayHeaders === undefined ? base.replayHeaders : replayHeaderSet(route.replayHeaders),
    retryAfterSeconds:
      route.retryAfter === undefined
        ? base.retryAfterSeconds
        : Math.ceil(toMilliseconds(route.retryAfter, 'retryAfter') / 1000),
    onReplay: route.onReplay ?? base.onReplay,
  };
}

const TRANSPORTS: readonly TransportType[] = ['http', 'graphql', 'rpc'];

/** Which transports each kind of key source serves (`header`: all of them). */
const KEY_SOURCE_TRANSPORTS: Readonly<Record<string, readonly TransportType[]>> = {
  header: TRANSPORTS,
  body: ['http'],
  arg: ['graphql'],
  payload: ['rpc'],
};

/**
 * `keyFrom` per transport, checked: one source for every transport it serves (`{ body }` is
 * HTTP's only: a GraphQL or message route of the same controller keeps its default), or sources
 * per transport, each of a kind that transport has.
 */
function keySourcesOf(option: unknown): KeySourcesOf {
  const refuse = (why: string): never => {
    throw new TypeError(
      `nestjs-idempotency: keyFrom${why.startsWith('.') ? '' : ' '}${why}. Give { header: 'X-Request-Id' }, { body: 'data.id' } (HTTP), { arg: 'input.requestId' } (GraphQL), { payload: 'meta.eventId' } (messages), a function (context) => key, or such sources per transport: { http, graphql, rpc }.`,
    );
  };
  if (typeof option === 'function') {
    const source = option as KeySource;
    return { sources: { http: source, graphql: source, rpc: source }, single: 'function' };
  }
  if (typeof option !== 'object' || option === null || Array.isArray(option))
    return refuse(`must be a key source; got ${describeValue(option)}`);
  const names = Object.keys(option);
  if (names.length === 1 && names[0] in KEY_SOURCE_TRANSPORTS) {
    const source = checkedKeySource(option, refuse, undefined);
    const sources: Partial<Record<TransportType, KeySource>> = {};
    for (const transport of KEY_SOURCE_TRANSPORTS[names[0]]) sources[transport] = source;
    return { sources, single: names[0] as KeySourcesOf['single'] };
  }
  const sources: Partial<Record<TransportType, KeySource>> = {};
  for (const name of names) {
    if (!TRANSPORTS.includes(name as TransportType))
      refuse(`has an unknown member ${JSON.stringify(name)}`);
    const value = (option as Record<string, unknown>)[name];
    if (value === undefined) continue;
    sources[name as TransportType] = checkedKeySource(value, refuse, name as TransportType);
  }
  return { sources, single: undefined };
}

function checkedKeySource(
  value: unknown,
  refuse: (why: string) => never,
  transport: TransportType | undefined,
): KeySource {
  const where = transport ? `.${transport}` : '';
  if (typeof value === 'function') return value as KeySource;
  if (typeof value !== 'object' || value === null)
    return refuse(`${where} must be a key source; got ${describeValue(value)}`);
  const names = Object.keys(value);
  if (names.length !== 1 || !(names[0] in KEY_SOURCE_TRANSPORTS))
    return refuse(`${where} must have exactly one of header, body, arg or payload`);
  const [kind] = names;
  if (transport && !KEY_SOURCE_TRANSPORTS[kind].includes(transport))
    refuse(`${where}: ${transport} has no ${kind}`);
  const path: unknown = (value as Record<string, unknown>)[kind];
  if (typeof path !== 'string' || path.trim() === '')
    refuse(`${where}.${kind} must be a non-empty string; got ${describeValue(path)}`);
  const text = path;
  if (kind === 'header' && !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(text))
    refuse(`${where}.header must be a header name; got ${JSON.stringify(text)}`);
  if (kind === 'header') return { header: text };
  const segments = text.split('.');
  if (segments.some((segment) => segment === '' || UNSAFE_SEGMENTS.has(segment)))
    refuse(
      `${where}.${kind} must be a dot path such as 'data.object.id'; got ${JSON.stringify(text)}`,
    );
  return { [kind]: text } as KeySource;
}

/** Path segments that would read an object's prototype rather than its data. */
const UNSAFE_SEGMENTS = new Set(['__proto__', 'prototype', 'constructor']);

function scopeOption(option: unknown): ScopeOption {
  if (option === false || typeof option === 'function') return option as ScopeOption;
  if (typeof option === 'object' && option !== null && !Array.isArray(option)) {
    for (const [name, value] of Object.entries(option)) {
      if (!TRANSPORTS.includes(name as TransportType))
        throw new TypeError(
          `nestjs-idempotency: scope has an unknown member ${JSON.stringify(name)}: give a resolver, false, or resolvers per transport { http, graphql, rpc }`,
        );
      if (value !== undefined && value !== false && typeof value !== 'function')
        throw new TypeError(
          `nestjs-idempotency: scope.${name} must be a resolver function or false; got ${describeValue(value)}`,
        );
    }
    return option as ScopeOption;
  }
  throw new TypeError(
    `nestjs-idempotency: scope must be a resolver function, false, or resolvers per transport { http, graphql, rpc }; got ${describeValue(option)}`,
  );
}

function fingerprintOption(route: IdempotencyRouteOptions): FingerprintOption {
  const { fingerprint } = route;
  if (fingerprint === false || typeof fingerprint === 'function') return fingerprint;
  throw new TypeError(
    `nestjs-idempotency: fingerprint must be a function (payload, context) => value, or false; got ${describeValue(fingerprint)}`,
  );
}

function replayHeaderSet(names: unknown): ReadonlySet<string> {
  if (!Array.isArray(names) || names.some((name) => typeof name !== 'string' || name === ''))
    throw new TypeError(
      `nestjs-idempotency: replayHeaders must be an array of header names; got ${describeValue(names)}`,
    );
  const set = new Set((names as string[]).map((name) => name.toLowerCase()));
  if (set.has('set-cookie'))
    throw new TypeError(
      "nestjs-idempotency: replayHeaders must not list set-cookie: a cookie belongs to the first caller's session, and a replay would hand it to whoever retries with the key. Set cookies outside the idempotent handler (a middleware or an interceptor listed before @Idempotent()).",
    );
  return set;
}

function expectFunction(value: unknown, option: string, shape: string): void {
  if (value !== undefined && typeof value !== 'function')
    throw new TypeError(
      `nestjs-idempotency: ${option} must be a function ${shape}; got ${describeValue(value)}`,
    );
}

function describeValue(value: unknown): string {
  if (Array.isArray(value)) return 'an array';
  switch (typeof value) {
    case 'string':
      return JSON.stringify(value);
    case 'object':
      return value === null ? 'null' : 'an object';
    case 'function':
      return 'a function';
    case 'undefined':
      return 'undefined';
    default:
      return `${typeof value} ${String(value)}`;
  }
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
