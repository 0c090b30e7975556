import { StreamableFile } from '@nestjs/common';
import type { StoredResponse } from '../storage/idempotency-store.interface.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { encodeBody } from '../utils/response-body.js';
import { quietLogger } from '../utils/quiet-logger.js';

const logger = quietLogger('Idempotency');

/** A result a transport wants stored: status (or its equivalent), headers, value. */
export interface ResultToStore {
  readonly key: string;
  readonly endpoint: string;
  readonly status: number;
  readonly headers: StoredResponse['headers'];
  readonly value: unknown;
  readonly isError: boolean;
}

/**
 * The stored form of a result, or `null` when it is not stored (its key is then released): a
 * status the policy does not keep, a stream, a value that cannot be serialised or is larger than
 * `maxResponseBytes`. Shared by every transport; the last three are logged.
 */
export function storedResult(
  result: ResultToStore,
  shouldStore: (status: number) => boolean,
  maxResponseBytes: number,
): StoredResponse | null {
  if (!shouldStore(result.status)) return null;
  const where = () => `key ${truncateKeyForLog(result.key)} on ${result.endpoint}`;
  if (result.value instanceof StreamableFile) {
    logger.error(
      `A StreamableFile cannot be stored: ${where()} was released, so a retry runs the handler again. Do not use @Idempotent() on streaming routes.`,
    );
    return null;
  }
  const encoded = encodeBody(result.value);
  const body = encoded?.body;
  // A UTF-16 unit is at most 3 bytes of UTF-8: most bodies need no byte count.
  const size = !body
    ? 0
    : body.length * 3 <= maxResponseBytes
      ? body.length
      : Buffer.byteLength(body);
  if (!encoded || size > maxResponseBytes) {
    logger.warn(
      `Response for ${where()} not stored (${encoded ? `${size} bytes, over maxResponseBytes` : 'not serialisable'}); key released.`,
    );
    return null;
  }
  return { status: result.status, headers: result.headers, ...encoded, isError: result.isError };
}

/**
 * `storedResult` for one call: given the key, endpoint and headers once, it takes the outcome's
 * status, value and whether it is an error.
 */
export function resultStorer(
  call: Pick<ResultToStore, 'key' | 'endpoint' | 'headers'>,
  shouldStore: (status: number) => boolean,
  maxResponseBytes: number,
): (status: number, value: unknown, isError: boolean) => StoredResponse | null {
  return (status, value, isError) =>
    storedResult({ ...call, status, value, isError }, shouldStore, maxResponseBytes);
}
