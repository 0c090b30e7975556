/**
 * Synthetic records, written straight into the table with one INSERT ... SELECT generate_series:
 * a million rows in seconds, where a million HTTP requests would take many minutes. The columns
 * follow lib/storage/typeorm/create-idempotency-records.migration.ts; the values look like what
 * the bench app stores (a completed 201 with a small JSON body).
 */
export const SYNTHETIC_ENDPOINT = 'POST /orders';
export const SYNTHETIC_FINGERPRINT = 'f'.repeat(64);
const HEADERS = JSON.stringify({ 'content-type': 'application/json; charset=utf-8' });

/**
 * Rows with keys `${prefix}${from}` … `${prefix}${to - 1}`, completed, expiring at `expiresAt`
 * (epoch ms: in the future for lookups, in the past for the purge).
 */
export function bulkInsertSql(
  table: string,
  from: number,
  to: number,
  expiresAt: number,
  prefix = 'g-',
): string {
  const body = `'{"id":"' || md5(g::text)::uuid || '","amount":1250,"currency":"eur","customer":"cus_bench","status":"accepted"}'`;
  return `INSERT INTO ${table} (scope, endpoint, idempotency_key, fingerprint, state, lease_token,
      expires_at, created_at, purge_at, response_status, response_headers, response_body,
      response_body_encoding, response_is_error)
    SELECT '', '${SYNTHETIC_ENDPOINT}', '${prefix}' || g, '${SYNTHETIC_FINGERPRINT}', 'completed',
      md5(g::text)::uuid::text, ${Math.trunc(expiresAt)}, ${Math.trunc(expiresAt) - 86_400_000},
      ${Math.trunc(expiresAt)}, 201,
      '${HEADERS}', ${body}, 'json', false
    FROM generate_series(${from}, ${to - 1}) AS g`;
}
