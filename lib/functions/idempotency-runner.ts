import { HttpException, Inject, Injectable } from '@nestjs/common';
import { IN_PROGRESS_RETRY_AFTER_SECONDS } from '../idempotency.constants.js';
import {
  downstreamKeyOf,
  IdempotencyContext,
  type IdempotentOperation,
} from '../idempotency.context.js';
import {
  RESOLVED_OPTIONS,
  resolveRouteOptions,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import {
  IdempotencyService,
  LeaseLostError,
  TransactionUnavailableError,
  UnstoredResultError,
  type Outcome,
} from '../idempotency.service.js';
import type {
  IdempotencyRouteOptions,
  ScopeValue,
} from '../interfaces/idempotency-options.interface.js';
import {
  IdempotencyConflictError,
  IdempotencyInvalidCallError,
  IdempotencyLeaseLostError,
  IdempotencyPayloadMismatchError,
  IdempotencyResultNotStoredError,
  IdempotencyResultUnreadableError,
  IdempotencyStoreUnavailableError,
  type IdempotencyRunErrorDetails,
} from '../errors/idempotency-run.errors.js';
import {
  IdempotencyStore,
  type RecordId,
  type StoredResponse,
} from '../storage/idempotency-store.interface.js';
import { boundedColumnValue } from '../transports/http-exchange.js';
import { storedResult } from '../transports/stored-result.js';
import { fingerprintRequest } from '../utils/fingerprint.js';
import { MAX_KEY_LENGTH } from '../idempotency.constants.js';
import { decodeBody } from '../utils/response-body.js';
import { scopeColumnValue } from '../utils/scope-value.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { quietLogger } from '../utils/quiet-logger.js';

/**
 * The options of a call that `IdempotencyRunner` makes idempotent, beyond its key, name, payload
 * and scope: the same as `@Idempotent()`'s, each defaulting to the module's.
 */
export type IdempotentCallOptions = Pick<
  IdempotencyRouteOptions,
  | 'ttl'
  | 'lockTimeout'
  | 'lockRenewalLimit'
  | 'transactional'
  | 'concurrency'
  | 'waitTimeout'
  | 'storeStatuses'
>;

/** One call of `IdempotencyRunner.run`: which operation, under which key, with which payload. */
export interface IdempotentRunOptions extends IdempotentCallOptions {
  /**
   * The operation's key: the same on every retry of one operation (a job id, a transfer id, a
   * command id), 1–255 printable ASCII characters, or a safe integer (`42` and `'42'` are one key).
   */
  readonly key: string | number;
  /**
   * The operation's name (e.g. `'charge-invoice'`): keys are independent per name (and per scope),
   * so two kinds of work never share a key space. Stored as the record's endpoint, `FN <name>`.
   */
  readonly name: string;
  /**
   * What makes two calls with one key the same call: fingerprinted (canonical JSON, key order
   * ignored) and compared on every retry; another payload under a used key is refused with
   * `IdempotencyPayloadMismatchError`.
   * @default undefined (only the key and the name count)
   */
  readonly payload?: unknown;
  /**
   * Whose key it is (a user id, a tenant id): keys are independent per scope.
   * @default '' (one scope for everyone)
   */
  readonly scope?: ScopeValue;
}

/** What the work receives: its operation (as `IdempotencyContext` tells it) and helpers. */
export interface IdempotentRunContext extends IdempotentOperation {
  /** A stable key for a downstream call of this operation (see `downstreamKeyOf`). */
  downstreamKey(name: string): string;
}

/** What `runDetailed` resolves to: the value, and whether it was replayed from the store. */
export interface IdempotentRunResult<T> {
  /** What the work returned (replayed: its stored JSON form). */
  readonly value: T;
  /** `true`: the key had completed already and the work did not run; `value` is the stored one. */
  readonly replayed: boolean;
}

/**
 * Options resolved once (durations in ms), for a caller that makes many calls with the same ones:
 * see `IdempotencyRunner.compile`.
 */
export interface CompiledCallOptions {
  /** The call's options over the module's, durations in ms. */
  readonly route: ResolvedRouteOptions;
}

/** Internal: the endpoint of a named operation. */
export function functionEndpoint(name: string): string {
  return boundedColumnValue(`FN ${name}`);
}

const IN_PROGRESS_RETRY_AFTER_MS = IN_PROGRESS_RETRY_AFTER_SECONDS * 1000;

/**
 * Makes any async function idempotent, outside an interceptor's reach: BullMQ processors, CQRS
 * command handlers, event listeners, scheduled jobs, plain service methods. With the same
 * guarantees as `@Idempotent()`: one claim per key (in every process sharing the store), its lease
 * renewed while the work runs, the payload's fingerprint compared, duplicates in flight waiting or
 * refused, the result stored (sealed with `encryption`) and replayed, transactional mode with its
 * EntityManager, downstream keys, metrics, events and traces.
 *
 * ```ts
 * const receipt = await this.idempotency.run(
 *   { key: command.transferId, name: 'transfer', payload: command },
 *   (ctx) => this.transfers.execute(command, ctx.downstreamKey('ledger')),
 * );
 * ```
 *
 * A returned value is stored as JSON and replayed in that form (a `Date` comes back as a string).
 * A thrown `HttpException` is stored by the `storeStatuses` policy (a 409 `ConflictException` is;
 * a 5xx, 400, 422 is not) and thrown again on replay as an `HttpException` of that status and
 * body; any other error releases the key, so the next call runs the work again. Refusals are
 * `IdempotencyRunError`s (see its subclasses), never HTTP exceptions.
 */
@Injectable()
export class IdempotencyRunner {
  private readonly logger = quietLogger('Idempotency');
  private readonly moduleRoute: ResolvedRouteOptions;

  constructor(
    private readonly service: IdempotencyService,
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
    @Inject(IdempotencyStore) private readonly store: Pick<IdempotencyStore, 'transaction'>,
  ) {
    this.moduleRoute = moduleOptions;
  }

  /**
   * Runs `work` once per key: the first call runs it and stores what it returns; a later call with
   * the key (in any process) gets the stored value without running it. Rejects with what `work`
   * threw, or with an `IdempotencyRunError` when the call is refused: in progress elsewhere
   * (`IdempotencyConflictError`), another payload (`IdempotencyPayloadMismatchError`), the store
   * unavailable (`IdempotencyStoreUnavailableError`), …
   */
  async run<T>(
    options: IdempotentRunOptions,
    work: (context: IdempotentRunContext) => Promise<T> | T,
  ): Promise<T> {
    return (await this.runDetailed(options, work)).value;
  }

  /** `run`, telling whether the value was replayed. */
  runDetailed<T>(
    options: IdempotentRunOptions,
    work: (context: IdempotentRunContext) => Promise<T> | T,
  ): Promise<IdempotentRunResult<T>> {
    return this.runCompiled(options, this.compile(options), work);
  }

  /**
   * Resolves a call's options (its durations, over the module's) once: a caller that makes many
   * calls with the same options passes the result to `runCompiled`. Throws on a malformed option,
   * and on `transactional` with a store that has no transactions (before any key is claimed).
   */
  compile(options: IdempotentCallOptions): CompiledCallOptions {
    const overrides = Object.fromEntries(
      (
        [
          'ttl',
          'lockTimeout',
          'lockRenewalLimit',
          'transactional',
          'concurrency',
          'waitTimeout',
          'storeStatuses',
        ] as const
      )
        .filter((field) => options[field] !== undefined)
        .map((field) => [field, options[field]]),
    ) as IdempotentCallOptions;
    const route =
      Object.keys(overrides).length === 0
        ? this.moduleRoute
        : resolveRouteOptions(this.moduleRoute, overrides);
    if (route.transactional && !this.store.transaction)
      throw new Error(
        'nestjs-idempotency: an idempotent call with `transactional: true`, but the store has no transactional mode. Use PostgreSQL, PGlite or MySQL/MariaDB through the TypeORM store, or drop `transactional`.',
      );
    return { route };
  }

  /** `runDetailed` with options from `compile` (the call's own durations in `options` are ignored). */
  async runCompiled<T>(
    call: Pick<IdempotentRunOptions, 'key' | 'name' | 'payload' | 'scope'>,
    compiled: CompiledCallOptions,
    work: (context: IdempotentRunContext) => Promise<T> | T,
  ): Promise<IdempotentRunResult<T>> {
    const { route } = compiled;
    const key = keyOf(call);
    const details: IdempotencyRunErrorDetails = { name: call.name, key };
    const scope = scopeColumnValue(call.scope);
    if (scope === undefined)
      throw new IdempotencyInvalidCallError(
        'scope-invalid',
        details,
        'its scope is no identity (a string, a number or a bigint).',
      );
    const id: RecordId = {
      scope: boundedColumnValue(scope),
      endpoint: functionEndpoint(call.name),
      key,
    };
    let fingerprint: string;
    try {
      fingerprint = fingerprintRequest({
        method: 'FN',
        url: id.endpoint,
        body: call.payload ?? null,
      });
    } catch {
      throw new IdempotencyInvalidCallError(
        'body-unreadable',
        details,
        'its payload cannot be fingerprinted (nested too deep, or not serialisable).',
      );
    }
    let decision;
    try {
      decision = await this.service.begin({
        id,
        fingerprint,
        lockTimeoutMs: route.lockTimeoutMs,
        ttlMs: route.ttlMs,
        concurrency: route.concurrency ?? 'wait',
        waitTimeoutMs: route.waitTimeoutMs,
      });
    } catch (error) {
      this.logger.error(
        `Idempotency store unavailable for ${call.name} with key ${truncateKeyForLog(key)}: ${(error as Error).message}`,
      );
      throw new IdempotencyStoreUnavailableError({ ...details, cause: error });
    }
    switch (decision.action) {
      case 'execute':
        try {
          const value = (await this.service.execute(
            decision.lease,
            fingerprint,
            route,
            () => Promise.resolve(work(contextOf(IdempotencyContext.current()!))),
            (outcome) => this.capture(id, outcome, route),
          )) as T;
          return { value, replayed: false };
        } catch (error) {
          if (error instanceof LeaseLostError) throw new IdempotencyLeaseLostError(details);
          if (error instanceof UnstoredResultError)
            throw new IdempotencyResultNotStoredError(details);
          if (error instanceof TransactionUnavailableError)
            throw new IdempotencyStoreUnavailableError(
              { ...details, cause: error.cause },
              'the connection of its transaction failed; nothing of it was committed.',
            );
          throw error;
        }
      case 'replay':
        return { value: replayed(decision.response) as T, replayed: true };
      case 'mismatch':
        throw new IdempotencyPayloadMismatchError(details);
      case 'in-progress':
        throw new IdempotencyConflictError(details, IN_PROGRESS_RETRY_AFTER_MS);
      case 'unreadable':
        throw new IdempotencyResultUnreadableError(details);
    }
  }

  /** The stored form of the work's outcome, or `null` (the key is released). */
  private capture(
    id: RecordId,
    outcome: Outcome,
    route: ResolvedRouteOptions,
  ): StoredResponse | null {
    try {
      return this.stored(id, outcome, route);
    } catch (thrown) {
      // A `storeStatuses` predicate that threw: not stored, the key released (as on routes).
      this.logger.error(
        `The store policy of ${id.endpoint} threw (${(thrown as Error)?.message ?? String(thrown)}): the outcome was not stored and its key was released.`,
      );
      return null;
    }
  }

  private stored(
    id: RecordId,
    outcome: Outcome,
    route: ResolvedRouteOptions,
  ): StoredResponse | null {
    const call = { key: id.key, endpoint: id.endpoint, headers: {} };
    const { maxResponseBytes } = this.moduleOptions;
    if (outcome.ok)
      return storedResult(
        { ...call, status: 200, value: outcome.value, isError: false },
        route.shouldStore,
        maxResponseBytes,
      );
    if (!(outcome.error instanceof HttpException)) return null;
    return storedResult(
      {
        ...call,
        status: outcome.error.getStatus(),
        value: outcome.error.getResponse(),
        isError: true,
      },
      route.shouldStore,
      maxResponseBytes,
    );
  }
}

/** The stored value, or the stored HttpException thrown again. */
function replayed(stored: StoredResponse): unknown {
  const body = decodeBody(stored);
  if (stored.isError) throw new HttpException(body as string | object, stored.status);
  return body;
}

function contextOf(operation: IdempotentOperation): IdempotentRunContext {
  return {
    ...operation,
    downstreamKey: (name: string) => downstreamKeyOf(operation, name),
  };
}

const PRINTABLE_ASCII = /^[\x20-\x7e]+$/;

/** The key as stored: a non-empty printable ASCII string of at most 255 characters, or an integer. */
function keyOf(call: Pick<IdempotentRunOptions, 'key' | 'name'>): string {
  if (typeof call.name !== 'string' || call.name === '')
    throw new TypeError(
      'nestjs-idempotency: an idempotent call needs a `name` (a non-empty string)',
    );
  const { key } = call;
  const text = typeof key === 'number' && Number.isSafeInteger(key) ? String(key) : key;
  if (typeof text === 'string' && PRINTABLE_ASCII.test(text) && text.length <= MAX_KEY_LENGTH)
    return text;
  throw new IdempotencyInvalidCallError(
    'key-invalid',
    { name: call.name, key: typeof text === 'string' ? text : '' },
    `its key must be 1–${MAX_KEY_LENGTH} printable ASCII characters, or a safe integer.`,
  );
}
