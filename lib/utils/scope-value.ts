/**
 * What a `scope` resolver returns: the caller's identity — a string, a number or a bigint (a user
 * id, a tenant id, a UUID, a hash of an API key) — or `null`/`undefined` for a caller without one.
 */
export type ScopeValue = string | number | bigint | null | undefined;

/**
 * The record's scope for what a resolver returned, or `undefined` when it cannot be an identity.
 * Numbers and bigints are stored in decimal, so `42`, `42n` and `'42'` are one caller (an id read
 * from the database as a number and from a token as a string); `null` and `undefined` are "no
 * identity", the empty scope that unscoped routes use. An object, an array, a boolean, `NaN`,
 * `±Infinity`, a symbol or a function is not an identity: turning it into a string would put
 * unrelated callers in one scope (`[object Object]`, `NaN`).
 */
export function scopeColumnValue(value: unknown): string | undefined {
  switch (typeof value) {
    case 'string':
      return value;
    case 'bigint':
      return value.toString();
    case 'number':
      return Number.isFinite(value) ? String(value) : undefined;
    case 'undefined':
      return '';
    default:
      return value === null ? '' : undefined;
  }
}

/** What a value that is no identity is, for the log: its kind, never its content. */
export function describeScopeValue(value: unknown): string {
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'number') return String(value);
  if (typeof value === 'object') return 'an object';
  return `a ${typeof value}`;
}
