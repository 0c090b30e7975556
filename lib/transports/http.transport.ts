import { HttpException, Inject, Injectable, type ExecutionContext } from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import { of, type Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import { httpExceptionFor, PROBLEM_CONTENT_TYPE } from '../errors/idempotency.exceptions.js';
import { IDEMPOTENT_REPLAYED_HEADER } from '../idempotency.constants.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { Outcome } from '../idempotency.service.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { readIdempotencyKey } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import {
  endpointOf,
  keyFieldLines,
  pinStatus,
  statusOf,
  storableHeaders,
  urlOf,
} from './http-exchange.js';
import type { FileFingerprint } from '../utils/fingerprint.js';
import { fingerprintsOf, readAhead, unreadBody, uploadedFiles } from './http-body.js';
import type { IdempotencyTransport, OperationDescription } from './idempotency-transport.js';
import { resultStorer } from './stored-result.js';

/**
 * HTTP (Express and Fastify): the key is the Idempotency-Key header, the operation is the route
 * (method and pattern) with the URL and body fingerprinted, replays carry the stored status and
 * headers plus `Idempotent-Replayed: true`, rejections are problem+json.
 */
@Injectable()
export class HttpTransport implements IdempotencyTransport {
  readonly type = 'http';
  readonly defaultConcurrency = 'reject';

  constructor(
    private readonly adapterHost: HttpAdapterHost,
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
  ) {}

  applies(): boolean {
    return true;
  }

  readKey(context: ExecutionContext) {
    return readIdempotencyKey(keyFieldLines(context.switchToHttp().getRequest()));
  }

  /**
   * The body as the platform parsed it (JSON, urlencoded), with the files multer parsed (hashed);
   * or, when no one has read the body yet (a multipart body whose FileInterceptor runs after this
   * interceptor, or that the handler reads), the body itself, read ahead and put back.
   */
  describe(context: ExecutionContext): OperationDescription | Promise<OperationDescription> {
    const request = context.switchToHttp().getRequest();
    const operation = (body: unknown, files?: FileFingerprint[]): OperationDescription => ({
      endpoint: endpointOf(request),
      scopeSource: request,
      fingerprint: { method: request.method, url: urlOf(request), body, files },
    });
    const unread = unreadBody(request);
    if (unread) return readAhead(unread).then((body) => operation(body));
    const files = uploadedFiles(request);
    if (files.length === 0) return operation(request.body);
    const route = `${context.getClass().name}.${context.getHandler().name}`;
    return fingerprintsOf(files, route).then((digests) => operation(request.body, digests));
  }

  /** Only an HttpException is an answer the handler chose; anything else is a crash (500). */
  capture(
    context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null {
    const response = context.switchToHttp().getResponse();
    const store = resultStorer(
      { key: id.key, endpoint: id.endpoint, headers: storableHeaders(response) },
      options.shouldStore,
      this.moduleOptions.maxResponseBytes,
    );
    if (outcome.ok) return store(statusOf(response), outcome.value, false);
    if (!(outcome.error instanceof HttpException)) return null;
    return store(outcome.error.getStatus(), outcome.error.getResponse(), true);
  }

  /** Sends a stored response again: same headers and body, the original (or configured) status. */
  replay(
    context: ExecutionContext,
    stored: StoredResponse,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    const response = context.switchToHttp().getResponse();
    const adapter = this.adapterHost.httpAdapter;
    for (const [name, value] of Object.entries(stored.headers)) {
      adapter.setHeader(response, name, value as string);
    }
    adapter.setHeader(response, IDEMPOTENT_REPLAYED_HEADER, 'true');
    const body = decodeBody(stored);
    // A stored error goes through the exception filters again, as the original did.
    if (stored.isError) throw new HttpException(body as string | object, stored.status);
    const status = options.replayStatus ?? stored.status;
    if (status !== statusOf(response)) pinStatus(response, status);
    return of(body);
  }

  /** problem+json: Content-Type and headers are set before the exception filter writes the body. */
  reject(context: ExecutionContext, rejection: IdempotencyRejection): Error {
    const problem = httpExceptionFor(rejection);
    const response = context.switchToHttp().getResponse();
    const adapter = this.adapterHost.httpAdapter;
    adapter.setHeader(response, 'Content-Type', PROBLEM_CONTENT_TYPE);
    for (const [name, value] of Object.entries(problem.headers))
      adapter.setHeader(response, name, value);
    return problem;
  }
}
