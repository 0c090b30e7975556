import { createHash } from 'node:crypto';
import { IDEMPOTENCY_KEY_HEADER, UNSTORED_RESPONSE_HEADERS } from '../idempotency.constants.js';

/**
 * Platform-neutral reads of the request and response objects: Express's `Request`/`Response`, and
 * Fastify's `FastifyRequest`/`FastifyReply` (whose Node objects sit under `.raw`).
 */

/** Every value of the Idempotency-Key header, one per field line (Node joins repeats with ", "). */
export function keyFieldLines(request: any): string[] {
  const rawHeaders: unknown = (request.raw ?? request).rawHeaders;
  if (Array.isArray(rawHeaders)) {
    const lines: string[] = [];
    for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
      if (String(rawHeaders[i]).toLowerCase() === IDEMPOTENCY_KEY_HEADER) lines.push(rawHeaders[i + 1]);
    }
    return lines;
  }
  const value: unknown = request.headers?.[IDEMPOTENCY_KEY_HEADER];
  if (value === undefined) return [];
  return Array.isArray(value) ? value.map(String) : [String(value)];
}

/** `METHOD /route/:pattern`: keys are per endpoint, whatever the path parameters. */
export function endpointOf(request: any): string {
  const pattern: unknown =
    request.route?.path !== undefined
      ? `${request.baseUrl ?? ''}${request.route.path}`
      : (request.routeOptions?.url ?? request.routerPath);
  const path = typeof pattern === 'string' ? pattern : pathOf(request);
  return boundedColumnValue(`${String(request.method).toUpperCase()} ${path}`);
}

/** The URL as sent, path and query: part of the fingerprint, so `/accounts/1` ≠ `/accounts/2`. */
export function urlOf(request: any): string {
  return String(request.originalUrl ?? request.url ?? '');
}

function pathOf(request: any): string {
  return urlOf(request).split('?')[0];
}

/**
 * Scope and endpoint columns hold 255 characters; longer values (a JWT as scope, say) are
 * replaced by their digest, which is just as unique.
 */
export function boundedColumnValue(value: string): string {
  return value.length <= 255 ? value : `sha256:${createHash('sha256').update(value).digest('hex')}`;
}

export function statusOf(response: any): number {
  return Number(response.statusCode ?? response.raw?.statusCode ?? 200);
}

/** The response headers worth replaying: the handler's own, Content-Type, Location. */
export function storableHeaders(response: any): Record<string, string | string[]> {
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
export function pinStatus(response: any, status: number): void {
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
