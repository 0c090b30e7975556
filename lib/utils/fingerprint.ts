import { createHash, hash } from 'node:crypto';

/** What identifies "the same request" for a key: method, URL and body (and uploaded files). */
export interface FingerprintInput {
  readonly method: string;
  /** The path and query as the client sent them (so `/accounts/1` and `/accounts/2` differ). */
  readonly url: string;
  readonly body: unknown;
  /** Files uploaded with the body (multipart), in the order they came; absent without any. */
  readonly files?: readonly FileFingerprint[];
}

/** One uploaded file: its form field, file name and type as sent, and its content's digest. */
export interface FileFingerprint {
  readonly field: string;
  readonly name: string;
  readonly type: string;
  readonly sha256: string;
}

/**
 * A SHA-256 hex digest of the request. JSON bodies are hashed in canonical form — object keys
 * sorted at every depth — so a client that re-serialises the same payload in another key order
 * still matches; array order is significant. Strings and Buffers (non-JSON bodies) are hashed as is,
 * uploaded files by their field, name, type and content digest.
 */
export function fingerprintRequest({ method, url, body, files }: FingerprintInput): string {
  const head = `${method.toUpperCase()}\n${url}\n`;
  // Only with files: the fingerprints of requests without any stay what they were.
  const tail = files && files.length > 0 ? `\nfiles:${canonicalJson(files)!}` : '';
  if (Buffer.isBuffer(body))
    return createHash('sha256').update(`${head}buffer:`).update(body).update(tail).digest('hex');
  // One string hashed at once (every request does this): the bytes the pieces would give.
  const text = typeof body === 'string' ? `text:${body}` : `json:${canonicalJson(body) ?? ''}`;
  return hash('sha256', head + text + tail);
}

/**
 * The deepest nesting of arrays and objects a JSON body may have. A deeper one is refused (the
 * request gets 400 `body-unreadable`) rather than fingerprinted: JSON.stringify (Express's
 * `res.json`, the stored response) overflows the stack a few thousand levels down, and no real
 * payload comes near a thousand.
 */
export const MAX_JSON_DEPTH = 1000;

/**
 * JSON.stringify with object keys sorted; `undefined` for a value JSON cannot represent. Written
 * out rather than as a replacer that rebuilds every object, and byte for byte the output of
 * `JSON.stringify(value, sortKeys)` (stored fingerprints must stay valid): an object's
 * array-index keys come first in numeric order, as a rebuilt object would enumerate them.
 */
export function canonicalJson(value: unknown, depth = 0): string | undefined {
  switch (typeof value) {
    case 'string':
      return JSON.stringify(value);
    case 'number':
      return Number.isFinite(value) ? String(value) : 'null';
    case 'boolean':
      return value ? 'true' : 'false';
    case 'bigint':
      return JSON.stringify(value); // throws, as JSON.stringify does
    case 'object':
      break;
    default:
      return undefined;
  }
  if (value === null) return 'null';
  if (depth >= MAX_JSON_DEPTH) {
    throw new RangeError(`JSON nested deeper than ${MAX_JSON_DEPTH} levels`);
  }
  const toJSON = (value as { toJSON?: unknown }).toJSON;
  if (typeof toJSON === 'function') return canonicalJson(toJSON.call(value, ''), depth);
  if (Array.isArray(value)) {
    let out = '[';
    for (let i = 0; i < value.length; i++)
      out += (i > 0 ? ',' : '') + (canonicalJson(value[i], depth + 1) ?? 'null');
    return `${out}]`;
  }
  const keys = Object.keys(value);
  // Object.keys lists array indices first, ascending; the other keys are sorted by code unit.
  let indices = 0;
  while (indices < keys.length && isArrayIndex(keys[indices])) indices++;
  const names =
    indices === 0 ? keys.sort() : [...keys.slice(0, indices), ...keys.slice(indices).sort()];
  let out = '{';
  for (const name of names) {
    const nested = canonicalJson((value as Record<string, unknown>)[name], depth + 1);
    if (nested === undefined) continue;
    out += `${out.length > 1 ? ',' : ''}${JSON.stringify(name)}:${nested}`;
  }
  return `${out}}`;
}

function isArrayIndex(name: string): boolean {
  // Most names start with a letter: no regex for them.
  const first = name.charCodeAt(0);
  if (!(first >= 48 && first <= 57)) return false;
  return /^(?:0|[1-9][0-9]*)$/.test(name) && Number(name) < 4294967295;
}

/**
 * The fingerprint of a route with a `fingerprint` option: the value its function returned, in
 * canonical JSON, hashed with the endpoint (method and route pattern, GraphQL field, message
 * pattern) and the scope; without a value (`fingerprint: false`), the endpoint and scope alone, so
 * every payload with the key is the same request.
 *
 * @param value what the route's function returned; omitted for `fingerprint: false`
 */
export function fingerprintOfValue(endpoint: string, scope: string, ...value: [unknown?]): string {
  const head = `${value.length > 0 ? 'value' : 'none'}\n${endpoint}\n${scope}\n`;
  return hash('sha256', value.length > 0 ? head + (canonicalJson(value[0]) ?? '') : head);
}
