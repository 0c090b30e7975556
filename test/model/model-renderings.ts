/**
 * What the client of each transport sees, for the model's predictions: a handler's result (first
 * run or replay) and the module's refusals, in a normalised form compared with `toEqual`; and the
 * store policy per outcome. Values that differ per request by design (a refusal's detail text, dates
 * of the HTTP response, ETags) are left out of the normal form.
 */
import type { Exchange } from '../support/http-client.js';
import {
  DATE_VALUE,
  graphqlFieldOf,
  jsonOf,
  MAIN_REPLAY_STATUS,
  type Outcome,
  type RawAnswer,
  type RouteName,
  type TransportName,
} from './model-app.js';
import type { RejectionCode, RunResult } from './reference-model.js';

/** Outcomes that exist on every transport. */
const COMMON_OUTCOMES: readonly Outcome[] = [
  'ok',
  'date',
  'http402',
  'http404',
  'http409',
  'http400',
  'http422',
  'http503',
  'error',
];

/** The outcomes a handler of `transport` can have. */
export function outcomesOf(transport: TransportName): Outcome[] {
  if (transport === 'graphql') return [...COMMON_OUTCOMES, 'gqlCode', 'gqlCode402'];
  if (transport === 'rpc-tcp') return [...COMMON_OUTCOMES, 'rpcNoStatus', 'rpcStatus402'];
  return [...COMMON_OUTCOMES];
}

/**
 * README "Which results are stored": 2xx and 4xx HttpExceptions are kept, except 400, 401, 403,
 * 408, 422, 429; every 5xx and every error that is not the handler's deliberate answer releases the
 * key. GraphQL: "an error with an extensions.code of its own replays as the same error". RPC:
 * "a duplicate gets the stored reply (or the stored RpcException)".
 */
export function isStored(outcome: Outcome): boolean {
  switch (outcome) {
    case 'ok':
    case 'date':
    case 'http402':
    case 'http404':
    case 'http409':
    case 'gqlCode':
    case 'gqlCode402':
    case 'rpcNoStatus':
    case 'rpcStatus402':
      return true;
    case 'http400':
    case 'http422':
    case 'http503':
    case 'error':
      return false;
  }
}

/** The status a stored result has in its row; undefined where the README does not say. */
export function storedStatus(transport: TransportName, outcome: Outcome): number | undefined {
  if (outcome === 'ok' || outcome === 'date') return transport.startsWith('http') ? 201 : 200;
  if (outcome.startsWith('http')) return Number(outcome.slice(4));
  if (outcome === 'gqlCode402' || outcome === 'rpcStatus402') return 402;
  return undefined;
}

const REJECTION_STATUS: Record<RejectionCode, number> = {
  'key-missing': 400,
  'key-reused': 422,
  'request-in-progress': 409,
};

/** `key-reused` → `IDEMPOTENCY_KEY_REUSED` */
const graphqlCode = (code: RejectionCode) => `IDEMPOTENCY_${code.replace(/-/g, '_').toUpperCase()}`;

/** The normal form of an answer. */
export type Observation = Record<string, unknown>;

/** What a handler's result looks like to the client, first time (`replayed` false) or replayed. */
export function expectedResult(
  transport: TransportName,
  route: RouteName,
  { outcome, run, p }: RunResult,
  replayed: boolean,
): Observation {
  const field = graphqlFieldOf(route);
  const value = { run, p, at: outcome === 'date' ? DATE_VALUE.toISOString() : null };
  const status = outcome.startsWith('http') ? Number(outcome.slice(4)) : 0;
  const httpBody =
    status === 503
      ? { code: 'unavailable', run }
      : status === 400 || status === 422
        ? { code: 'invalid', run }
        : { code: 'refused', run };
  switch (transport) {
    case 'http-express':
    case 'http-fastify': {
      const answer = (code: number, body: unknown) => ({
        status: code,
        body,
        replayed,
        handlerHeader: 'handler',
      });
      if (outcome === 'ok' || outcome === 'date')
        return answer(replayed && route === 'main' ? MAIN_REPLAY_STATUS : 201, value);
      if (status) return answer(status, httpBody);
      return answer(500, { statusCode: 500, message: 'Internal server error' });
    }
    case 'graphql': {
      const error = (message: string, code: string) => ({
        data: null,
        errors: [{ message, path: [field], code }],
      });
      if (outcome === 'ok' || outcome === 'date') return { data: value, errors: [] };
      if (status) return error('Http Exception', 'INTERNAL_SERVER_ERROR');
      if (outcome === 'gqlCode' || outcome === 'gqlCode402')
        return error(`declined in run ${run}`, 'CARD_DECLINED');
      return error(`handler crashed in run ${run}`, 'INTERNAL_SERVER_ERROR');
    }
    case 'rpc-tcp': {
      if (outcome === 'ok' || outcome === 'date') return { reply: value };
      if (outcome === 'rpcNoStatus') return { error: { code: 'declined', run } };
      if (outcome === 'rpcStatus402') return { error: { code: 'declined', statusCode: 402, run } };
      // Nest's RPC exception filter answers anything but an RpcException this way.
      return { error: { status: 'error', message: 'Internal server error' } };
    }
  }
}

/** What a refusal of the module looks like (README "GraphQL and message handlers", the table). */
export function expectedRejection(
  transport: TransportName,
  route: RouteName,
  code: RejectionCode,
): Observation {
  const field = graphqlFieldOf(route);
  const status = REJECTION_STATUS[code];
  const inProgress = code === 'request-in-progress';
  switch (transport) {
    case 'http-express':
    case 'http-fastify':
      return { status, problem: code, ...(inProgress ? { retryAfter: '1' } : {}) };
    case 'graphql':
      return {
        data: null,
        errors: [
          {
            path: [field],
            code: graphqlCode(code),
            status,
            ...(inProgress ? { retryAfterSeconds: 1 } : {}),
          },
        ],
      };
    case 'rpc-tcp':
      return {
        error: {
          status: 'error',
          code,
          statusCode: status,
          ...(inProgress ? { retryAfterSeconds: 1 } : {}),
        },
      };
  }
}

const PROBLEM_TYPE = 'tag:nestjs-idempotency,2026:';

/** The normal form of what came back. */
export function observe(answer: RawAnswer): Observation {
  switch (answer.kind) {
    case 'http':
      return observeHttp(answer.exchange);
    case 'graphql':
      return observeGraphQL(answer.exchange, answer.field);
    case 'rpc':
      return answer.ok ? { reply: answer.reply } : { error: withoutMessage(answer.error) };
  }
}

function observeHttp(exchange: Exchange): Observation {
  if (exchange.error) return { noAnswer: exchange.error };
  const body = jsonOf(exchange) ?? exchange.text;
  const contentType = String(exchange.headers['content-type'] ?? '');
  if (contentType.startsWith('application/problem+json')) {
    const type = String(body?.type ?? '');
    const retryAfter = exchange.headers['retry-after'];
    return {
      status: exchange.status,
      problem: type.startsWith(PROBLEM_TYPE) ? type.slice(PROBLEM_TYPE.length) : type,
      ...(retryAfter === undefined ? {} : { retryAfter }),
      ...(body?.status === exchange.status ? {} : { bodyStatus: body?.status }),
    };
  }
  return {
    status: exchange.status,
    body,
    replayed: exchange.headers['idempotent-replayed'] === 'true',
    handlerHeader: exchange.headers['x-model'],
  };
}

interface GraphQLErrorJson {
  message?: string;
  path?: unknown;
  extensions?: { code?: unknown; status?: unknown; retryAfterSeconds?: unknown };
}

function observeGraphQL(exchange: Exchange, field: string): Observation {
  if (exchange.error) return { noAnswer: exchange.error };
  const body = jsonOf(exchange) as
    { data?: Record<string, unknown> | null; errors?: GraphQLErrorJson[] } | undefined;
  if (!body) return { status: exchange.status, text: exchange.text };
  return {
    data: body.data?.[field] ?? null,
    errors: (body.errors ?? []).map((error) => {
      const code = error.extensions?.code;
      const own = typeof code === 'string' && code.startsWith('IDEMPOTENCY_');
      return definedOnly({
        // The module's refusals: their code and status say it all (the detail is prose).
        message: own ? undefined : error.message,
        path: error.path,
        code,
        status: error.extensions?.status,
        retryAfterSeconds: error.extensions?.retryAfterSeconds,
      });
    }),
  };
}

/** The module's RPC refusals carry a prose `message`: compared without it. */
function withoutMessage(error: unknown): unknown {
  if (error && typeof error === 'object' && 'code' in error && 'statusCode' in error) {
    const { message: _message, ...rest } = error as Record<string, unknown>;
    return rest;
  }
  return error;
}

function definedOnly(object: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}
