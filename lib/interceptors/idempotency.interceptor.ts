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
import { catchError, defer, lastValueFrom, of, type Observable } from 'rxjs';
import { IDEMPOTENT_REPLAYED_HEADER, IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import {
  RESOLVED_OPTIONS,
  resolveRouteOptions,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import {
  IdempotencyService,
  LeaseLostError,
  UnstoredResultError,
  type Decision,
  type Outcome,
} from '../idempotency.service.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import {
  IdempotencyBodyUnreadableException,
  IdempotencyException,
  IdempotencyKeyInvalidException,
  IdempotencyKeyMissingException,
  IdempotencyKeyReusedException,
  IdempotencyLeaseLostException,
  IdempotencyRequestInProgressException,
  IdempotencyResultNotStoredException,
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
      return this.act(decision, fingerprint, response, next, options);
    } catch (error) {
      if (error instanceof IdempotencyException) this.prepareProblem(response, error);
      throw error;
    }
  }

  private act(
    decision: Decision,
    fingerprint: string,
    response: any,
    next: CallHandler,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    switch (decision.action) {
      case 'execute':
        return this.execute(decision.lease, fingerprint, response, next, options);
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

  /**
   * Runs the handler through the service (which renews the claim, and in transactional mode wraps
   * the handler in the transaction); before the response leaves, it is stored or the key released.
   */
  private execute(
    lease: Lease,
    fingerprint: string,
    response: any,
    next: CallHandler,
    options: ResolvedRouteOptions,
  ): Observable<unknown> {
    return defer(() =>
      this.service.execute(
        lease,
        fingerprint,
        options,
        () => lastValueFrom(next.handle(), { defaultValue: undefined }),
        (outcome) => this.capture(lease, options, response, outcome),
      ),
    ).pipe(
      catchError((error: unknown) => {
        const problem =
          error instanceof LeaseLostError
            ? new IdempotencyLeaseLostException()
            : error instanceof UnstoredResultError
              ? new IdempotencyResultNotStoredException()
              : undefined;
        if (!problem) throw error;
        this.prepareProblem(response, problem);
        throw problem;
      }),
    );
  }

  /**
   * The response to store for a handler's outcome, or null to release the key. Only an
   * HttpException is an answer the handler chose; anything else is a crash (500).
   */
  private capture(lease: Lease, options: ResolvedRouteOptions, response: any, outcome: Outcome): StoredResponse | null {
    if (outcome.ok) return this.storable(lease, options, response, statusOf(response), outcome.value, false);
    const { error } = outcome;
    if (!(error instanceof HttpException)) return null;
    return this.storable(lease, options, response, error.getStatus(), error.getResponse(), true);
  }

  /** The stored form of a result, if the policy keeps its status and it can be stored. */
  private storable(
    lease: Lease,
    options: ResolvedRouteOptions,
    response: any,
    status: number,
    value: unknown,
    isError: boolean,
  ): StoredResponse | null {
    if (!options.shouldStore(status)) return null;
    if (value instanceof StreamableFile) {
      this.logger.error(
        `A StreamableFile cannot be stored: key ${truncateKeyForLog(lease.id.key)} on ${lease.id.endpoint} was released, so a retry runs the handler again. Do not use @Idempotent() on streaming routes.`,
      );
      return null;
    }
    const encoded = encodeBody(value);
    const size = encoded?.body ? Buffer.byteLength(encoded.body) : 0;
    if (!encoded || size > this.moduleOptions.maxResponseBytes) {
      this.logger.warn(
        `Response for key ${truncateKeyForLog(lease.id.key)} on ${lease.id.endpoint} not stored (${encoded ? `${size} bytes, over maxResponseBytes` : 'not serialisable'}); key released.`,
      );
      return null;
    }
    return { status, headers: storableHeaders(response), ...encoded, isError };
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
