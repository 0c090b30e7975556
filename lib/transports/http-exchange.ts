import { createHash } from 'node:crypto';
import { IDEMPOTENCY_KEY_HEADER, UNSTORED_RESPONSE_HEADERS } from '../idempotency.constants.js';

/**
 * Platform-neutral reads of the request and response objects: Express's `Request`/`Response`, and
 * Fastify's `FastifyRequest`/`FastifyReply` (whose Node objects sit under `.raw`).
 */

/** What is read of a request: Express's and Fastify's members, each optional. */
export interface PlatformRequest {
  readonly raw?: { readonly rawHeaders?: unknown };
  readonly rawHeaders?: unknown;
  readonly headers?: Readonly<Record<string, unknown>>;
  readonly method?: unknown;
  readonly originalUrl?: unknown;
  readonly url?: unknown;
  /** Express's matched route and router mount path. */
  readonly route?: { readonly path?: unknown };
  readonly baseUrl?: unknown;
  /** Fastify's route pattern (v4+), and its older name. */
  readonly routeOptions?: { readonly url?: unknown };
  readonly routerPath?: unknown;
}

/** What is read and patched of a response: Express's `Response` or Fastify's `FastifyReply`. */
export interface PlatformResponse {
  statusCode?: unknown;
  readonly raw?: { readonly statusCode?: unknown };
  getHeaders?: () => Record<string, unknown>;
  [member: string]: unknown;
}

/** Every value of the Idempotency-Key header, one per field line (Node joins repeats with ", "). */
export function keyFieldLines(request: PlatformRequest): string[] {
  const rawHeaders: unknown = (request.raw ?? request).rawHeaders;
  if (Array.isArray(rawHeaders)) {
    const lines: string[] = [];
    for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
      if (String(rawHeaders[i]).toLowerCase() === IDEMPOTENCY_KEY_HEADER)
        lines.push(String(rawHeaders[i + 1]));
    }
    return lines;
  }
  const value: unknown = request.headers?.[IDEMPOTENCY_KEY_HEADER];
  if (value === undefined) return [];
  return Array.isArray(value) ? value.map(String) : [String(value)];
}

/** `METHOD /route/:pattern`: keys are per endpoint, whatever the path parameters. */
export function endpointOf(request: PlatformRequest): string {
  const pattern: unknown =
    request.route?.path !== undefined
      ? `${String(request.baseUrl ?? '')}${String(request.route.path)}`
      : (request.routeOptions?.url ?? request.routerPath);
  const path = typeof pattern === 'string' ? pattern : pathOf(request);
  return boundedColumnValue(`${String(request.method).toUpperCase()} ${path}`);
}

/** The URL as sent, path and query: part of the fingerprint, so `/accounts/1` ≠ `/accounts/2`. */
export function urlOf(request: PlatformRequest): string {
  return String(request.originalUrl ?? request.url ?? '');
}

function pathOf(request: PlatformRequest): string {
  return urlOf(request).split('?')[0];
}

/**
 * Scope and endpoint columns hold 255 characters; longer values (a JWT as scope, say) are
 * replaced by their digest, which is just as unique.
 */
export function boundedColumnValue(value: string): string {
  return value.length <= 255 ? value : `sha256:${createHash('sha256').update(value).digest('hex')}`;
}

export function statusOf(response: PlatformResponse): number {
  return Number(response.statusCode ?? response.raw?.statusCode ?? 200);
}

/** The response headers worth replaying: the handler's own, Content-Type, Location. */
export function storableHeaders(response: PlatformResponse): Record<string, string | string[]> {
  const headers: Record<string, unknown> =
    typeof response.getHeaders === 'function' ? response.getHeaders() : {};
  const stored: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || UNSTORED_RESPONSE_HEADERS.has(name.toLowerCase())) continue;
    stored[name] = Array.isArray(value) ? value.map(String) : String(value);
  }
  return stored;
}

/**
 * Sets a replay's status when it differs from the route's own. Nest's response handling sets the
 * route's status (`@HttpCode`, or 201 for POST) again after the interceptors, through the response's
 * `status()` (Express) or `code()` (Fastify); on this one response object those become no-ops.
 */
export function pinStatus(response: PlatformResponse, status: number): void {
  if (typeof response.status === 'function') response.status(status);
  else response.statusCode = status;
  for (const method of ['status', 'code']) {
    if (typeof response[method] === 'function') {
      response[method] = function keepPinnedStatus(this: unknown) {
        return this;
      };
    }
  }
}
