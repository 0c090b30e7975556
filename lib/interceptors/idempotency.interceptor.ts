import {
  HttpException,
  Inject,
  Injectable,
  Logger,
  StreamableFile,
  type CallHandler,
  type ExecutionContext,
  type NestInterceptor,
} from '@nestjs/common';
import { HttpAdapterHost, Reflector } from '@nestjs/core';
import { concatMap, of, type Observable } from 'rxjs';
import { catchError } from 'rxjs/operators';
import { IDEMPOTENT_REPLAYED_HEADER, IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import {
  RESOLVED_OPTIONS,
  resolveRouteOptions,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import { IdempotencyService, type Decision } from '../idempotency.service.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import {
  IdempotencyBodyUnreadableException,
  IdempotencyException,
  IdempotencyKeyInvalidException,
  IdempotencyKeyMissingException,
  IdempotencyKeyReusedException,
  IdempotencyRequestInProgressException,
  IdempotencyStoreUnavailableException,
  PROBLEM_CONTENT_TYPE,
} from '../errors/idempotency.exceptions.js';
import type { Lease, StoredResponse } from '../storage/idempotency-store.interface.js';
import { fingerprintRequest } from '../utils/fingerprint.js';
import { readIdempotencyKey, truncateKeyForLog } from '../utils/idempotency-key.js';
import { decodeBody, encodeBody } from '../utils/response-body.js';
import {
  boundedColumnValue,
  endpointOf,
  keyFieldLines,
  pinStatus,
  statusOf,
  storableHeaders,
  urlOf,
} from './http-exchange.js';

/** Marks a request already handled, when `@Idempotent()` sits on both a controller and a method. */
const HANDLED = Symbol('IdempotencyHandled');

/**
 * The HTTP side: reads the key, fingerprints the request, asks the service for a decision and acts
 * on it — run the handler and store its result, replay a stored result, or answer a problem.
 */
@Injectable()
export class IdempotencyInterceptor implements NestInterceptor {
  private readonly logger = new Logger('Idempotency');
  private readonly routeOptions = new WeakMap<Function, ResolvedRouteOptions>();

  constructor(
    private readonly reflector: Reflector,
    private readonly service: IdempotencyService,
    private readonly adapterHost: HttpAdapterHost,
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
  ) {}

  async intercept(context: ExecutionContext, next: CallHandler): Promise<Observable<unknown>> {
    if (context.getType() !== 'http') return next.handle();
    const request = context.switchToHttp().getRequest();
    const response = context.switchToHttp().getResponse();
    if (request[HANDLED]) return next.handle();
    request[HANDLED] = true;
    const options = this.optionsFor(context);
    try {
      const reading = readIdempotencyKey(keyFieldLines(request));
      if (reading.kind === 'invalid') throw new IdempotencyKeyInvalidException(reading.reason);
      if (reading.kind === 'absent') {
        if (options.required) throw new IdempotencyKeyMissingException();
        return next.handle();
      }
      const id = {
        scope: boundedColumnValue(await options.scope(request)),
        endpoint: endpointOf(request),
        key: reading.key,
      };
      const fingerprint = this.fingerprint(request);
      const decision = await this.decide(id.key, () =>
        this.service.begin({
          id,
          fingerprint,
          lockTimeoutMs: options.lockTimeoutMs,
          concurrency: options.concurrency,
          waitTimeoutMs: options.waitTimeoutMs,
        }),
      );
      return this.act(decision, response, next, options);
    } catch (error) {
      if (error instanceof IdempotencyException) this.prepareProblem(response, error);
      throw error;
    }
  }

  private act(
    decision: Decision,
    response: any,
    next: CallHandler,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    switch (decision.action) {
      case 'execute':
        return this.execute(decision.lease, response, next, options);
      case 'replay':
        return this.replay(decision.response, response, options);
      case 'mismatch':
        throw new IdempotencyKeyReusedException();
      case 'in-progress':
        throw new IdempotencyRequestInProgressException(
          Math.max(1, Math.ceil(decision.retryAfterMs / 1000)),
        );
    }
  }

  /** Runs the handler, and before its response leaves, stores it or releases the key. */
  private execute(
    lease: Lease,
    response: any,
    next: CallHandler,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    return next.handle().pipe(
      concatMap(async (value) => {
        await this.settle(lease, options, response, statusOf(response), value, false);
        return value;
      }),
      catchError(async (error: unknown) => {
        // Only an HttpException is an answer the handler chose; anything else is a crash (500).
        if (error instanceof HttpException) {
          await this.settle(lease, options, response, error.getStatus(), error.getResponse(), true);
        } else {
          await this.service.release(lease);
        }
        throw error;
      }),
    );
  }

  /** Stores the outcome if the policy keeps its status, else releases the key. */
  private async settle(
    lease: Lease,
    options: ResolvedRouteOptions,
    response: any,
    status: number,
    value: unknown,
    isError: boolean,
  ): Promise<void> {
    if (!options.shouldStore(status)) return this.service.release(lease);
    if (value instanceof StreamableFile) {
      this.logger.error(
        `A StreamableFile cannot be stored: key ${truncateKeyForLog(lease.id.key)} on ${lease.id.endpoint} was released, so a retry runs the handler again. Do not use @Idempotent() on streaming routes.`,
      );
      return this.service.release(lease);
    }
    const encoded = encodeBody(value);
    const size = encoded?.body ? Buffer.byteLength(encoded.body) : 0;
    if (!encoded || size > this.moduleOptions.maxResponseBytes) {
      this.logger.warn(
        `Response for key ${truncateKeyForLog(lease.id.key)} on ${lease.id.endpoint} not stored (${encoded ? `${size} bytes, over maxResponseBytes` : 'not serialisable'}); key released.`,
      );
      return this.service.release(lease);
    }
    const stored: StoredResponse = {
      status,
      headers: storableHeaders(response),
      ...encoded,
      isError,
    };
    await this.service.complete(lease, stored, options.ttlMs);
  }

  /** Sends a stored response again: same headers and body, the original (or configured) status. */
  private replay(
    stored: StoredResponse,
    response: any,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
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

  /** Decides, turning a store failure into a 503: the handler never runs without a claim. */
  private async decide(key: string, begin: () => Promise<Decision>): Promise<Decision> {
    try {
      return await begin();
    } catch (error) {
      this.logger.error(
        `Idempotency store unavailable for key ${truncateKeyForLog(key)}: ${(error as Error).message}`,
      );
      throw new IdempotencyStoreUnavailableException();
    }
  }

  private fingerprint(request: any): string {
    try {
      return fingerprintRequest({ method: request.method, url: urlOf(request), body: request.body });
    } catch {
      throw new IdempotencyBodyUnreadableException();
    }
  }

  /** Content-Type and headers of a problem, set before the exception filter writes its body. */
  private prepareProblem(response: any, problem: IdempotencyException): void {
    const adapter = this.adapterHost.httpAdapter;
    adapter.setHeader(response, 'Content-Type', PROBLEM_CONTENT_TYPE);
    for (const [name, value] of Object.entries(problem.headers)) {
      adapter.setHeader(response, name, value);
    }
  }

  private optionsFor(context: ExecutionContext): ResolvedRouteOptions {
    const handler = context.getHandler();
    let resolved = this.routeOptions.get(handler);
    if (!resolved) {
      const route = this.reflector.getAllAndOverride<IdempotencyRouteOptions | undefined>(
        IDEMPOTENT_ROUTE_OPTIONS,
        [handler, context.getClass()],
      );
      resolved = resolveRouteOptions(this.moduleOptions, route ?? {});
      this.routeOptions.set(handler, resolved);
    }
    return resolved;
  }
}
