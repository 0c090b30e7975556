import { HttpException, Inject, Injectable, type ExecutionContext } from '@nestjs/common';
import { of, type Observable } from 'rxjs';
import { graphqlCodeOf, type IdempotencyRejection } from '../errors/idempotency-rejection.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { Outcome } from '../idempotency.service.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { readIdempotencyKey, type KeyReading } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import { boundedColumnValue, keyFieldLines } from './http-exchange.js';
import type { IdempotencyTransport, OperationDescription } from './idempotency-transport.js';
import { resultStorer } from './stored-result.js';

/** The argument of a mutation that carries the key; without it, the Idempotency-Key header. */
export const GRAPHQL_KEY_ARGUMENT = 'idempotencyKey';

/** The parts of graphql-js' GraphQLResolveInfo read here (graphql stays an optional peer). */
interface ResolveInfo {
  readonly fieldName: string;
  readonly parentType: { readonly name: string };
  readonly operation: { readonly operation: string };
  readonly path: { readonly key: string | number; readonly prev: ResolveInfo['path'] | undefined };
  readonly schema: { getMutationType(): { readonly name: string } | null | undefined };
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
 * graphql.
 */
export class IdempotencyGraphQLError extends Error {
  constructor(
    message: string,
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
 * field's arguments. A replay returns the stored field value while the operation's other fields run
 * as usual; rejections are errors with `extensions.code` (`IDEMPOTENCY_KEY_REUSED`, …).
 */
@Injectable()
export class GraphQLTransport implements IdempotencyTransport {
  readonly type = 'graphql';
  readonly defaultConcurrency = 'reject';

  constructor(@Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions) {}

  applies(context: ExecutionContext): boolean {
    const info = argsOf(context)[3];
    return (
      info?.operation?.operation === 'mutation' &&
      info.parentType?.name === info.schema?.getMutationType()?.name
    );
  }

  readKey(context: ExecutionContext): KeyReading {
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

  describe(context: ExecutionContext): OperationDescription {
    const [, args, graphqlContext, info] = argsOf(context);
    const field = `${info!.parentType.name}.${info!.fieldName}`;
    return {
      endpoint: boundedColumnValue(`GRAPHQL ${field} as ${responsePath(info!.path)}`),
      scopeSource: httpRequestOf(graphqlContext),
      fingerprint: { method: 'GRAPHQL', url: field, body: args ?? {} },
    };
  }

  capture(
    _context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null {
    const store = resultStorer(
      { key: id.key, endpoint: id.endpoint, headers: {} },
      options.shouldStore,
      this.moduleOptions.maxResponseBytes,
    );
    if (outcome.ok) return store(200, outcome.value, false);
    const { error } = outcome;
    if (error instanceof HttpException) return store(error.getStatus(), error.getResponse(), true);
    const extensions = (error as { extensions?: unknown } | null)?.extensions;
    const code = (extensions as { code?: unknown } | undefined)?.code;
    // A GraphQL error with a code of its own (BAD_USER_INPUT, a business code) is an answer the
    // resolver chose; without one it is a crash, like any other error, and the key is released.
    if (error instanceof Error && typeof code === 'string' && code !== 'INTERNAL_SERVER_ERROR') {
      const status = Number((extensions as { http?: { status?: unknown } }).http?.status ?? 400);
      const stored: StoredGraphQLError = {
        graphqlError: { message: error.message, extensions: extensions as Record<string, unknown> },
      };
      return store(status, stored, true);
    }
    return null;
  }

  replay(_context: ExecutionContext, stored: StoredResponse): Observable<unknown> {
    const body = decodeBody(stored);
    if (!stored.isError) return of(body);
    const graphqlError = (body as Partial<StoredGraphQLError> | null)?.graphqlError;
    if (graphqlError)
      throw new IdempotencyGraphQLError(graphqlError.message, graphqlError.extensions);
    throw new HttpException(body as string | object, stored.status);
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

function argsOf(context: ExecutionContext): ResolverArgs {
  return context.getArgs() as ResolverArgs;
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
