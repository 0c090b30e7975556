import { createHash } from 'node:crypto';
import type { ScopeResolver } from '../../lib/index.js';

/**
 * Keys are per API key: two clients that happen to pick the same Idempotency-Key never see each
 * other's responses. Requests without `x-api-key` share the '' scope (the sample has no auth).
 *
 * The scope is stored in the idempotency table, so it holds a digest of the API key rather than
 * the credential itself.
 */
export const apiKeyScope: ScopeResolver = (request: { headers?: Record<string, unknown> }) => {
  const apiKey: unknown = request.headers?.['x-api-key'];
  if (typeof apiKey !== 'string' || apiKey === '') return '';
  return `api-key:${createHash('sha256').update(apiKey).digest('hex')}`;
};
