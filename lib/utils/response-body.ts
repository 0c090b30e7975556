import type { StoredResponse } from '../storage/idempotency-store.interface.js';

/** A handler's return value in the form it is stored. */
export type EncodedBody = Pick<StoredResponse, 'body' | 'bodyEncoding'>;

/**
 * Serialises what the handler returned. Buffers keep their bytes (base64); anything else is stored
 * as JSON, which is also what the platform sends for it. `undefined` when it cannot be serialised
 * (a cycle, a BigInt): such a response is sent but not stored.
 */
export function encodeBody(value: unknown): EncodedBody | undefined {
  if (value === undefined) return { body: null, bodyEncoding: 'json' };
  if (Buffer.isBuffer(value)) return { body: value.toString('base64'), bodyEncoding: 'base64' };
  try {
    return { body: JSON.stringify(value) ?? null, bodyEncoding: 'json' };
  } catch {
    return undefined;
  }
}

/** The value to hand back to the platform on replay; the platform serialises it as the first time. */
export function decodeBody({ body, bodyEncoding }: EncodedBody): unknown {
  if (body === null) return undefined;
  return bodyEncoding === 'base64' ? Buffer.from(body, 'base64') : JSON.parse(body);
}
