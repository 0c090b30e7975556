import { HttpException, Inject, Injectable, type ExecutionContext } from '@nestjs/common';
import { ApplicationConfig, HttpAdapterHost } from '@nestjs/core';
import { of, type Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import { httpExceptionFor, PROBLEM_CONTENT_TYPE } from '../errors/idempotency.exceptions.js';
import { IDEMPOTENT_REPLAYED_HEADER } from '../idempotency.constants.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { Outcome } from '../core/types.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import type { KeySource } from '../interfaces/idempotency-options.interface.js';
import { readIdempotencyKey } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import {
  endpointOf,
  headerSnapshot,
  headersSent,
  keyFieldLines,
  operationMethodOf,
  replayableHeaders,
  setReplayStatus,
  statusOf,
  storableHeaders,
  urlOf,
  type HeaderSnapshot,
  type PlatformRequest,
  type PlatformResponse,
} from './http-exchange.js';
import type { FileFingerprint } from '../utils/fingerprint.js';
import {
  fingerprintsOf,
  readAhead,
  unreadBody,
  uploadedFiles,
  type BodyRequest,
} from './http-body.js';
import {
  functionKeyReader,
  pathKeyReader,
  sourceParts,
  type IdempotencyTransport,
  type KeyReader,
  type OperationDescription,
} from './idempotency-transport.js';
import { EXCEPTION_ENTRY, ReplayedExceptions } from './replayed-exception.js';
import { storedResult } from './stored-result.js';

/**
 * HTTP (Express and Fastify): the key is the Idempotency-Key header, the operation is the route
 * (method and pattern) with the URL and body fingerprinted (a HEAD is its GET's operation), replays
 * carry the stored status and the handler's headers plus `Idempotent-Replayed: true`, and a stored
 * error is thrown again as its own class; rejections are problem+json.
 */
const storeAlways = () => true;

@Injectable()
export class HttpTransport implements IdempotencyTransport {
  readonly type = 'http';
  readonly defaultConcurrency = 'reject';

  /**
   * Each response's status when the interceptor started, the route's (`@HttpCode`, 201 for POST),
   * which Nest sets before the interceptors (a timeout that answers a waiting duplicate changes it
   * later); and its headers when the handler was about to run (`prepare`): what the handler sets
   * comes after.
   */
  private readonly before = new WeakMap<
    PlatformResponse,
    { readonly status: number; headers?: HeaderSnapshot }
  >();
  private readonly exceptions: ReplayedExceptions;

  constructor(
    private readonly adapterHost: HttpAdapterHost,
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
    config: ApplicationConfig,
  ) {
    this.exceptions = new ReplayedExceptions(() => [
      ...config.getGlobalFilters(),
      ...config.getGlobalRequestFilters().map((wrapper) => wrapper.metatype),
    ]);
  }

  applies(): boolean {
    return true;
  }

  /** The Idempotency-Key header, or `keyFrom`'s header, body path or function. */
  keyReader(source: KeySource | undefined): KeyReader {
    if (source === undefined)
      return (context) => readIdempotencyKey(keyFieldLines(context.switchToHttp().getRequest()));
    if (typeof source === 'function') return functionKeyReader(source);
    const [kind, text] = sourceParts(source);
    if (kind === 'header') {
      const name = text.toLowerCase();
      return (context) =>
        readIdempotencyKey(keyFieldLines(context.switchToHttp().getRequest(), name), text);
    }
    if (kind === 'body')
      return pathKeyReader(
        text,
        "the body's",
        (context) => context.switchToHttp().getRequest<{ body?: unknown }>().body,
      );
    return () => ({ kind: 'absent' });
  }

  /**
   * The body as the platform parsed it (JSON, urlencoded), with the files multer parsed (hashed);
   * or, when no one has read the body yet (a multipart body whose FileInterceptor runs after this
   * interceptor, or that the handler reads), the body itself, read ahead and put back.
   */
  describe(
    context: ExecutionContext,
    fingerprinted: boolean,
  ): OperationDescription | Promise<OperationDescription> {
    const http = context.switchToHttp();
    const request = http.getRequest<PlatformRequest & BodyRequest & { readonly body?: unknown }>();
    const response = http.getResponse<PlatformResponse>();
    this.before.set(response, { status: statusOf(response) });
    const handler = context.getHandler();
    // A route with a fingerprint of its own: no upload read ahead nor hashed, only the body given.
    if (!fingerprinted)
      return {
        endpoint: endpointOf(request, handler),
        scopeSource: request,
        payload: request.body,
      };
    const operation = (body: unknown, files?: FileFingerprint[]): OperationDescription => ({
      endpoint: endpointOf(request, handler),
      scopeSource: request,
      payload: body,
      fingerprint: {
        method: operationMethodOf(request, handler),
        url: urlOf(request),
        body,
        files,
      },
    });
    const unread = unreadBody(request);
    if (unread) return readAhead(unread).then((body) => operation(body));
    const files = uploadedFiles(request);
    if (files.length === 0) return operation(request.body);
    const route = `${context.getClass().name}.${handler.name}`;
    return fingerprintsOf(files, route).then((digests) => operation(request.body, digests));
  }

  /**
   * Snapshots the response's headers before the handler runs, so only those it sets are stored
   * (a replay or a rejection needs none).
   */
  prepare(context: ExecutionContext): void {
    const response = context.switchToHttp().getResponse<PlatformResponse>();
    const before = this.before.get(response);
    if (before) before.headers = headerSnapshot(response);
  }

  /** Only an HttpException is an answer the handler chose; anything else is a crash (500). */
  capture(
    context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null {
    const response = context.switchToHttp().getResponse<PlatformResponse>();
    const before = this.before.get(response);
    // Answered already, by an interceptor or filter around this one (a timeout interceptor's 408)
    // while the handler ran on: the response's status and headers are that answer's. The handler's
    // outcome is stored with the route's status, so the client's retry gets it.
    const answered = headersSent(response);
    const headers = answered
      ? {}
      : storableHeaders(response, before?.headers, options.replayHeaders);
    const { key, endpoint } = id;
    const { shouldStore } = options;
    const { maxResponseBytes } = this.moduleOptions;
    if (outcome.ok) {
      const status = answered ? (before?.status ?? 200) : statusOf(response);
      const value = outcome.value;
      return storedResult(
        { key, endpoint, headers, status, value, isError: false },
        shouldStore,
        maxResponseBytes,
      );
    }
    const error = outcome.error;
    const route = { handler: context.getHandler(), controller: context.getClass() };
    if (!(error instanceof HttpException)) {
      // A domain error a filter renders: stored only when `storeIf` says so, as a 500 (what Nest
      // answers without a filter), and thrown again, of its class, by a replay.
      if (!options.storesAnyError || !(error instanceof Error) || !shouldStore(500, error))
        return null;
      return storedResult(
        {
          key,
          endpoint,
          headers: { ...headers, [EXCEPTION_ENTRY]: this.exceptions.domainEntryFor(error, route) },
          status: 500,
          value: { message: error.message },
          isError: true,
        },
        storeAlways,
        maxResponseBytes,
      );
    }
    const entry = this.exceptions.entryFor(error, route);
    return storedResult(
      {
        key,
        endpoint,
        headers: entry ? { ...headers, [EXCEPTION_ENTRY]: entry } : headers,
        status: error.getStatus(),
        value: error.getResponse(),
        isError: true,
      },
      (status) => shouldStore(status, error),
      maxResponseBytes,
    );
  }

  /**
   * Sends a stored response again: the same body, the handler's headers (those the retry's own
   * middleware and guards have not set), the original (or configured) status.
   */
  replay(
    context: ExecutionContext,
    stored: StoredResponse,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    const response = context.switchToHttp().getResponse<PlatformResponse>();
    const adapter = this.adapterHost.httpAdapter;
    for (const [name, value] of replayableHeaders(
      response,
      stored.headers,
      options.replayHeaders,
    )) {
      adapter.setHeader(response, name, value as string);
    }
    adapter.setHeader(response, IDEMPOTENT_REPLAYED_HEADER, 'true');
    const body = decodeBody(stored);
    // A stored error goes through the exception filters again, as its own class, as the original did.
    if (stored.isError) {
      throw this.exceptions.thrownAgain(
        context.getHandler(),
        context.getClass(),
        stored.headers[EXCEPTION_ENTRY],
        body,
        stored.status,
      );
    }
    const status = options.replayStatus ?? stored.status;
    if (status !== statusOf(response)) setReplayStatus(response, status);
    return of(body);
  }

  /** problem+json: Content-Type and headers are set before the exception filter writes the body. */
  reject(context: ExecutionContext, rejection: IdempotencyRejection): Error {
    const problem = httpExceptionFor(rejection);
    const response = context.switchToHttp().getResponse<unknown>();
    const adapter = this.adapterHost.httpAdapter;
    adapter.setHeader(response, 'Content-Type', PROBLEM_CONTENT_TYPE);
    for (const [name, value] of Object.entries(problem.headers))
      adapter.setHeader(response, name, value);
    return problem;
  }
}
