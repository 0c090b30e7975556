import { RequestMethod } from '@nestjs/common';
import { METHOD_METADATA } from '@nestjs/common/constants.js';
import { hash } from 'node:crypto';
import { IDEMPOTENCY_KEY_HEADER, UNSTORED_RESPONSE_HEADERS } from '../idempotency.constants.js';
import { EXCEPTION_ENTRY } from './replayed-exception.js';

/**
 * Platform-neutral reads of the request and response objects: Express's `Request`/`Response`, and
 * Fastify's `FastifyRequest`/`FastifyReply` (whose Node objects sit under `.raw`).
 */

/** What is read of a request: Express's and Fastify's members, each optional. */
export interface PlatformRequest {
  readonly raw?: { readonly rawHeaders?: unknown };
  readonly rawHeaders?: unknown;
  readonly headers?: Readonly<Record<string, string | string[] | undefined>>;
  readonly method?: unknown;
  readonly originalUrl?: string;
  readonly url?: string;
  /** Express's matched route and router mount path. */
  readonly route?: { readonly path?: string };
  readonly baseUrl?: string;
  /** Fastify's route pattern (v4+), and its older name. */
  readonly routeOptions?: { readonly url?: unknown };
  readonly routerPath?: unknown;
}

/** What is read and patched of a response: Express's `Response` or Fastify's `FastifyReply`. */
export interface PlatformResponse {
  statusCode?: unknown;
  readonly raw?: { readonly statusCode?: unknown; readonly headersSent?: unknown };
  getHeaders?: () => Record<string, unknown>;
  /** Express's and Fastify's status setter. */
  status?: (code: number) => unknown;
  [member: string]: unknown;
}

/**
 * Every value of a request header (by default Idempotency-Key), one per field line (Node joins
 * repeats with ", ").
 *
 * @param name the header's name, lower-case
 */
export function keyFieldLines(
  request: PlatformRequest,
  name: string = IDEMPOTENCY_KEY_HEADER,
): readonly string[] {
  const rawHeaders: unknown = (request.raw ?? request).rawHeaders;
  if (Array.isArray(rawHeaders)) {
    let lines: string[] | undefined;
    for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
      const field: unknown = rawHeaders[i];
      // Most names differ in length: only a name of the same length is lower-cased and compared.
      if (
        typeof field === 'string' &&
        field.length === name.length &&
        (field === name || field.toLowerCase() === name)
      )
        (lines ??= []).push(String(rawHeaders[i + 1]));
    }
    return lines ?? NO_LINES;
  }
  const value = request.headers?.[name];
  if (value === undefined) return NO_LINES;
  return Array.isArray(value) ? value.map(String) : [String(value)];
}

const NO_LINES: readonly string[] = [];

/**
 * The request's method as an operation: upper-case, and a HEAD served by a GET route's handler is
 * its GET (the platforms serve it so, and its answer is the GET's without the body), so a HEAD
 * with a GET's key is answered from the GET's record instead of running the handler again. A HEAD
 * with a `@Head()` handler of its own is its own operation.
 *
 * @param handler the route's handler, whose `@Get()`/`@Head()` tells which route serves the HEAD
 */
export function operationMethodOf(request: PlatformRequest, handler?: Function): string {
  const method = String(request.method).toUpperCase();
  if (method !== 'HEAD') return method;
  const routeMethod: unknown = handler && Reflect.getMetadata(METHOD_METADATA, handler);
  return routeMethod === RequestMethod.HEAD ? method : 'GET';
}

/** `METHOD /route/:pattern`: keys are per endpoint, whatever the path parameters. */
export function endpointOf(request: PlatformRequest, handler?: Function): string {
  const pattern: unknown =
    request.route?.path !== undefined
      ? `${String(request.baseUrl ?? '')}${String(request.route.path)}`
      : (request.routeOptions?.url ?? request.routerPath);
  const path = typeof pattern === 'string' ? pattern : pathOf(request);
  return boundedColumnValue(`${operationMethodOf(request, handler)} ${path}`);
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
  return value.length <= 255 ? value : `sha256:${hash('sha256', value)}`;
}

/** Whether the response's status and headers have gone out (Express's, or Fastify's raw one). */
export function headersSent(response: PlatformResponse): boolean {
  return Boolean(response.raw?.headersSent ?? response.headersSent);
}

export function statusOf(response: PlatformResponse): number {
  return Number(response.statusCode ?? response.raw?.statusCode ?? 200);
}

/** A response's headers at one moment: lower-cased names, values as sent. */
export type HeaderSnapshot = Readonly<Record<string, string | string[]>>;

/** The response's headers now: taken just before the handler runs, and when it has. */
export function headerSnapshot(response: PlatformResponse): HeaderSnapshot {
  const snapshot: Record<string, string | string[]> = {};
  if (typeof response.getHeaders !== 'function') return snapshot;
  // A copy already (Node's and Fastify's), with lower-case names; values may be numbers.
  const headers = response.getHeaders();
  for (const name in headers) {
    const value = headers[name];
    if (value !== undefined) snapshot[name.toLowerCase()] = headerValue(value);
  }
  return snapshot;
}

/**
 * The entry of stored headers that names those the handler set over a value they had before it
 * (`Cache-Control` that a middleware set, `Vary` that CORS set): a replay sets these over the
 * retry's own, as the first answer had them. Not a header, never sent by a replay.
 */
export const REPLACED_HEADERS_ENTRY = 'nestjs-idempotency-replaced-headers';

/**
 * The response headers worth replaying: those the handler (and what runs inside the interceptor)
 * set or changed since `before` — its Content-Type, Location, own headers. Not those of the
 * request's middleware, guards, CORS or outer interceptors (a request id, a rate-limit count, an
 * allowed origin), which the retry gets afresh, nor `Set-Cookie` and hop-by-hop headers. Those it
 * changed from a value set before are named in the `REPLACED_HEADERS_ENTRY` entry.
 *
 * @param allowed a route's `replayHeaders` (lower-case): only these, and Content-Type, are stored
 */
export function storableHeaders(
  response: PlatformResponse,
  before: HeaderSnapshot = {},
  allowed?: ReadonlySet<string>,
): Record<string, string | string[]> {
  const stored: Record<string, string | string[]> = {};
  const replaced: string[] = [];
  for (const [name, value] of Object.entries(headerSnapshot(response))) {
    if (
      UNSTORED_RESPONSE_HEADERS.has(name) ||
      INTERNAL_ENTRIES.has(name) ||
      (allowed !== undefined && !isAllowed(name, allowed)) ||
      sameValue(before[name], value)
    )
      continue;
    stored[name] = value;
    if (before[name] !== undefined) replaced.push(name);
  }
  if (replaced.length > 0) stored[REPLACED_HEADERS_ENTRY] = replaced.join(',');
  return stored;
}

/**
 * The stored headers a replay sets: each one the current response does not have yet, and those
 * the handler set over an earlier value. What the retry's middleware and guards set (its request
 * id, its rate-limit count, its CORS origin) is the retry's own, also against a record stored with
 * such headers by an earlier version.
 *
 * @param allowed a route's `replayHeaders` (lower-case): only these, and Content-Type, are sent,
 *   also of a record stored before the route listed them
 */
export function replayableHeaders(
  response: PlatformResponse,
  stored: Readonly<Record<string, string | string[]>>,
  allowed?: ReadonlySet<string>,
): [string, string | string[]][] {
  const current = typeof response.getHeaders === 'function' ? response.getHeaders() : {};
  const replacedEntry = stored[REPLACED_HEADERS_ENTRY];
  const replaced =
    replacedEntry === undefined ? undefined : new Set(String(replacedEntry).split(','));
  const replayed: [string, string | string[]][] = [];
  for (const name in stored) {
    const lower = name.toLowerCase();
    if (
      !INTERNAL_ENTRIES.has(lower) &&
      !UNSTORED_RESPONSE_HEADERS.has(lower) &&
      (allowed === undefined || isAllowed(lower, allowed)) &&
      (current[lower] === undefined || replaced?.has(lower) === true)
    )
      replayed.push([name, stored[name]]);
  }
  return replayed;
}

/**
 * Entries of stored headers that are not headers (the names of those replaced, a stored error's
 * class): never taken from a response, never sent by a replay.
 */
const INTERNAL_ENTRIES: ReadonlySet<string> = new Set([REPLACED_HEADERS_ENTRY, EXCEPTION_ENTRY]);

/** Content-Type always: without it a replayed body would change meaning. */
function isAllowed(name: string, allowed: ReadonlySet<string>): boolean {
  return name === 'content-type' || allowed.has(name);
}

function headerValue(value: unknown): string | string[] {
  return Array.isArray(value) ? value.map(String) : String(value);
}

function sameValue(a: string | string[] | undefined, b: string | string[]): boolean {
  if (a === undefined) return false;
  if (typeof a === 'string' || typeof b === 'string') return a === b;
  return a.length === b.length && a.every((item, i) => item === b[i]);
}

/**
 * Sets a replay's status when it differs from the route's own. Nest sets the route's status
 * (`@HttpCode`, or 201 for POST) before the interceptors run, and not again after them, so this
 * is the status sent, while an error raised after the replay (an outer interceptor's, answered by
 * an exception filter) still gets its own.
 */
export function setReplayStatus(response: PlatformResponse, status: number): void {
  if (typeof response.status === 'function') response.status(status);
  else response.statusCode = status;
}
