import { createHash } from 'node:crypto';

/** What identifies "the same request" for a key: method, URL and body. */
export interface FingerprintInput {
  readonly method: string;
  /** The path and query as the client sent them (so `/accounts/1` and `/accounts/2` differ). */
  readonly url: string;
  readonly body: unknown;
}

/**
 * A SHA-256 hex digest of the request. JSON bodies are hashed in canonical form — object keys
 * sorted at every depth — so a client that re-serialises the same payload in another key order
 * still matches; array order is significant. Strings and Buffers (non-JSON bodies) are hashed as is.
 */
export function fingerprintRequest({ method, url, body }: FingerprintInput): string {
  const hash = createHash('sha256');
  hash.update(method.toUpperCase()).update('\n').update(url).update('\n');
  if (Buffer.isBuffer(body)) hash.update('buffer:').update(body);
  else if (typeof body === 'string') hash.update('text:').update(body);
  else hash.update('json:').update(canonicalJson(body) ?? '');
  return hash.digest('hex');
}

/** JSON.stringify with object keys sorted; `undefined` for a value JSON cannot represent. */
export function canonicalJson(value: unknown): string | undefined {
  return JSON.stringify(value, (_key, nested: unknown) =>
    nested !== null && typeof nested === 'object' && !Array.isArray(nested)
      ? Object.fromEntries(
          Object.entries(nested as Record<string, unknown>).sort(([a], [b]) =>
            a < b ? -1 : a > b ? 1 : 0,
          ),
        )
      : nested,
  );
}
