import {
  HttpException,
  HttpStatus,
  Inject,
  Injectable,
  IntrinsicException,
  type ExecutionContext,
} from '@nestjs/common';
import { ApplicationConfig } from '@nestjs/core';
import { of, type Observable } from 'rxjs';
import { graphqlCodeOf, type IdempotencyRejection } from '../errors/idempotency-rejection.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { Outcome } from '../core/types.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { readIdempotencyKey, type KeyReading } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import {
  fingerprintedArguments,
  replayedFieldValue,
  storedFieldValue,
  type GraphQLSchemaLike,
  type GraphQLTypeLike,
} from './graphql-values.js';
import { boundedColumnValue, keyFieldLines } from './http-exchange.js';
import type { KeySource } from '../interfaces/idempotency-options.interface.js';
import {
  functionKeyReader,
  pathKeyReader,
  sourceParts,
  type IdempotencyTransport,
  type KeyReader,
  type OperationDescription,
} from './idempotency-transport.js';
import { EXCEPTION_ENTRY, ReplayedExceptions } from './replayed-exception.js';
import { resultStorer } from './stored-result.js';

/** The argument of a mutation that carries the key; without it, the Idempotency-Key header. */
export const GRAPHQL_KEY_ARGUMENT = 'idempotencyKey';

/** The parts of graphql-js' GraphQLResolveInfo read here (graphql stays an optional peer). */
interface ResolveInfo {
  readonly fieldName: string;
  readonly parentType: {
    readonly name: string;
    getFields?(): Record<string, { readonly args?: readonly ArgumentDefinition[] } | undefined>;
  };
  readonly returnType?: GraphQLTypeLike;
  readonly operation: { readonly operation: string };
  readonly path: { readonly key: string | number; readonly prev: ResolveInfo['path'] | undefined };
  readonly schema: GraphQLSchemaLike;
}

interface ArgumentDefinition {
  readonly name: string;
  readonly type: GraphQLTypeLike;
}

type ResolverArgs = [
  root: unknown,
  args: Record<string, unknown> | undefined,
  context: GraphQLContext | undefined,
  info: ResolveInfo | undefined,
];
/** Nest's GraphQL context: Express and Apollo give `req`, Fastify `request` (and `req` in some setups). */
interface GraphQLContext {
  readonly req?: unknown;
  readonly request?: unknown;
}

/**
 * A business error of a resolver, as GraphQL knows it (graphql-js' GraphQLError and anything with
 * `extensions`): stored with its message and extensions, replayed as the same error.
 */
interface StoredGraphQLError {
  readonly graphqlError: { readonly message: string; readonly extensions: Record<string, unknown> };
}

/**
 * An error with `extensions`: graphql-js takes them over when it wraps the error for the response
 * (`locatedError`), so the client sees `errors[].extensions.code` without this module importing
 * graphql. Intrinsic (as `HttpException` is): a refusal or a replayed business error is an answer,
 * not a crash, so Nest's exception handler does not log it as an error with its stack.
 */
export class IdempotencyGraphQLError extends IntrinsicException {
  constructor(
    message: string,
    /**
     * The error's `extensions`, as the client sees them: `code` (e.g. `IDEMPOTENCY_KEY_REUSED`),
     * `status` and `retryAfterSeconds` on a refusal; the stored ones on a replayed business error.
     */
    readonly extensions: Record<string, unknown>,
  ) {
    super(message);
    this.name = 'IdempotencyGraphQLError';
  }
}

/**
 * GraphQL (@nestjs/graphql): `@Idempotent()` protects root mutation fields. Each field of an
 * operation is a record of its own — its endpoint holds the field and its response key (the
 * alias) — so two mutations in one document never share a record. The key is the field's
 * `idempotencyKey` argument, else the request's Idempotency-Key header; the fingerprint is the
 * field's arguments. A replay returns the stored field value, its leaves in their schema types
 * (`graphql-values.ts`: Dates, custom scalars, enums), while the operation's other fields run as
 * usual; rejections are errors with `extensions.code` (`IDEMPOTENCY_KEY_REUSED`, …).
 */
@Injectable()
export class GraphQLTransport implements IdempotencyTransport {
  readonly type = 'graphql';
  readonly defaultConcurrency = 'reject';

  private readonly exceptions: ReplayedExceptions;

  constructor(
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
    config: ApplicationConfig,
  ) {
    this.exceptions = new ReplayedExceptions(() => [
      ...config.getGlobalFilters(),
      ...config.getGlobalRequestFilters().map((wrapper) => wrapper.metatype),
    ]);
  }

  applies(context: ExecutionContext): boolean {
    const info = argsOf(context)[3];
    return (
      info?.operation?.operation === 'mutation' &&
      info.parentType?.name === info.schema?.getMutationType()?.name
    );
  }

  /**
   * The `idempotencyKey` argument, else the Idempotency-Key header; or `keyFrom`'s header (of the
   * HTTP request), argument path or function.
   */
  keyReader(source: KeySource | undefined): KeyReader {
    if (source === undefined) return (context) => this.readKey(context);
    if (typeof source === 'function') return functionKeyReader(source);
    const [kind, text] = sourceParts(source);
    if (kind === 'header') {
      const name = text.toLowerCase();
      return (context) => {
        const request = httpRequestOf(argsOf(context)[2]);
        return request
          ? readIdempotencyKey(keyFieldLines(request, name), text)
          : { kind: 'absent' };
      };
    }
    if (kind === 'arg') return pathKeyReader(text, 'the argument', (context) => argsOf(context)[1]);
    return () => ({ kind: 'absent' });
  }

  private readKey(context: ExecutionContext): KeyReading {
    const [, args, graphqlContext] = argsOf(context);
    const argument = args?.[GRAPHQL_KEY_ARGUMENT];
    if (argument !== undefined && argument !== null) {
      if (typeof argument !== 'string')
        return {
          kind: 'invalid',
          reason: `The ${GRAPHQL_KEY_ARGUMENT} argument must be a string.`,
        };
      return readIdempotencyKey([argument]);
    }
    const request = httpRequestOf(graphqlContext);
    return request ? readIdempotencyKey(keyFieldLines(request)) : { kind: 'absent' };
  }

  describe(context: ExecutionContext, fingerprinted: boolean): OperationDescription {
    const [, args, graphqlContext, info] = argsOf(context);
    const field = `${info!.parentType.name}.${info!.fieldName}`;
    const endpoint = boundedColumnValue(`GRAPHQL ${field} as ${responsePath(info!.path)}`);
    const scopeSource = httpRequestOf(graphqlContext);
    if (!fingerprinted) return { endpoint, scopeSource, payload: args ?? {} };
    return {
      endpoint,
      scopeSource,
      payload: args ?? {},
      fingerprint: {
        method: 'GRAPHQL',
        url: field,
        body: fingerprintedArguments(
          args ?? {},
          info!.parentType.getFields?.()[info!.fieldName]?.args,
        ),
      },
    };
  }

  capture(
    context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null | Promise<StoredResponse | null> {
    const error = outcome.ok ? undefined : outcome.error;
    const store = (status: number, value: unknown, isError: boolean, headers = {}) =>
      resultStorer(
        { key: id.key, endpoint: id.endpoint, headers },
        (stored) => options.shouldStore(stored, error),
        this.moduleOptions.maxResponseBytes,
      )(status, value, isError);
    if (outcome.ok) {
      const [, , graphqlContext, info] = argsOf(context);
      return storedFieldValue(
        outcome.value,
        info?.returnType,
        info?.schema,
        graphqlContext,
        info,
      ).then((value) => store(200, value, false));
    }
    if (error instanceof HttpException) {
      // Its class, so the filters that caught it catch its replay (`@Catch(OutOfStockException)`).
      const entry = this.exceptions.entryFor(error);
      return store(
        error.getStatus(),
        error.getResponse(),
        true,
        entry ? { [EXCEPTION_ENTRY]: entry } : {},
      );
    }
    const extensions = (error as { extensions?: unknown } | null)?.extensions;
    const code = (extensions as { code?: unknown } | undefined)?.code;
    // A GraphQL error with a code of its own (BAD_USER_INPUT, a business code) is an answer the
    // resolver chose; without one it is a crash, like any other error, and the key is released.
    if (error instanceof Error && typeof code === 'string' && code !== 'INTERNAL_SERVER_ERROR') {
      const status = graphqlErrorStatus(code, extensions as { http?: { status?: unknown } });
      const stored: StoredGraphQLError = {
        graphqlError: {
          message: error.message,
          extensions: storedExtensions(extensions as Record<string, unknown>),
        },
      };
      return store(status, stored, true);
    }
    // Any other error is a crash, unless `storeIf` keeps it (a domain error, as a 500).
    if (options.storesAnyError && error instanceof Error) {
      const stored: StoredGraphQLError = {
        graphqlError: { message: error.message, extensions: {} },
      };
      return store(500, stored, true);
    }
    return null;
  }

  replay(context: ExecutionContext, stored: StoredResponse): Observable<unknown> {
    const body = decodeBody(stored);
    if (!stored.isError) return of(replayedFieldValue(body, argsOf(context)[3]?.schema));
    const graphqlError = (body as Partial<StoredGraphQLError> | null)?.graphqlError;
    if (graphqlError)
      throw new IdempotencyGraphQLError(
        graphqlError.message,
        replayedExtensions(graphqlError.extensions),
      );
    throw this.exceptions.thrownAgain(
      context.getHandler(),
      context.getClass(),
      stored.headers[EXCEPTION_ENTRY],
      body,
      stored.status,
    );
  }

  reject(_context: ExecutionContext, rejection: IdempotencyRejection): Error {
    return new IdempotencyGraphQLError(rejection.detail, {
      code: graphqlCodeOf(rejection.code),
      // Not `http`: Apollo would apply it to the whole response, though only this field failed.
      status: rejection.status,
      ...(rejection.retryAfterSeconds === undefined
        ? {}
        : { retryAfterSeconds: rejection.retryAfterSeconds }),
    });
  }
}

/**
 * What a GraphQL error with a code of its own counts as for `storeStatuses`, by default: the status
 * of a deliberate business answer (`INSUFFICIENT_FUNDS`, `ALREADY_REFUNDED`, …), stored and
 * replayed as HTTP's 402 or 409 are. 409 Conflict: the request conflicts with the state of things.
 */
const GRAPHQL_BUSINESS_ERROR_STATUS = 409;

/** Codes that ask the client to correct its request, as Apollo and @nestjs/apollo name them. */
const GRAPHQL_CLIENT_ERROR_STATUSES: ReadonlyMap<string, number> = new Map([
  ['BAD_USER_INPUT', 400],
  ['BAD_REQUEST', 400],
  ['GRAPHQL_VALIDATION_FAILED', 400],
  ['GRAPHQL_PARSE_FAILED', 400],
  ['OPERATION_RESOLUTION_FAILURE', 400],
  ['UNAUTHENTICATED', 401],
  ['FORBIDDEN', 403],
]);

/**
 * The status of a GraphQL error with a code: its `extensions.http.status` when it has one; else
 * 400, 401 or 403 for a code that asks the client to correct the request (released by default,
 * so the corrected retry runs with the same key); the status a code is named after (`NOT_FOUND`
 * 404, `CONFLICT` 409, `TOO_MANY_REQUESTS` 429, as in Nest's HttpStatus); any other code is a
 * business answer, `GRAPHQL_BUSINESS_ERROR_STATUS` (stored by default).
 */
function graphqlErrorStatus(code: string, extensions: { http?: { status?: unknown } }): number {
  const http = Number(extensions.http?.status);
  if (Number.isInteger(http) && http >= 100 && http <= 599) return http;
  const named = (HttpStatus as unknown as Record<string, unknown>)[code];
  return (
    GRAPHQL_CLIENT_ERROR_STATUSES.get(code) ??
    (typeof named === 'number' && named >= 400 ? named : GRAPHQL_BUSINESS_ERROR_STATUS)
  );
}

/**
 * An error's extensions as stored: Apollo's `http.headers` (a Map, whose JSON is `{}`) as its
 * entries. Apollo takes `http` out of the response only when its headers are a Map.
 */
function storedExtensions(extensions: Record<string, unknown>): Record<string, unknown> {
  const http = extensions.http as { headers?: unknown } | undefined;
  if (!(http?.headers instanceof Map)) return extensions;
  return { ...extensions, http: { ...http, headers: [...http.headers.entries()] } };
}

/** The extensions to throw again: `http.headers` a Map again (from its entries, or a record). */
function replayedExtensions(extensions: Record<string, unknown>): Record<string, unknown> {
  const http = extensions?.http as { headers?: unknown } | undefined;
  const headers = http?.headers;
  if (typeof headers !== 'object' || headers === null) return extensions;
  try {
    const entries = Array.isArray(headers) ? headers : Object.entries(headers);
    return { ...extensions, http: { ...http, headers: new Map(entries as [string, string][]) } };
  } catch {
    return extensions;
  }
}

function argsOf(context: ExecutionContext): ResolverArgs {
  return context.getArgs<ResolverArgs>();
}

function httpRequestOf(context: GraphQLContext | undefined): unknown {
  return context?.req ?? context?.request;
}

/** The response path of the field (`pay1`, or `payments.0.refund` for nested ones). */
function responsePath(path: ResolveInfo['path'] | undefined): string {
  const keys: (string | number)[] = [];
  for (let at = path; at; at = at.prev) keys.unshift(at.key);
  return keys.join('.');
}
