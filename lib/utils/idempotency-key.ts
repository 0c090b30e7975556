import { MAX_KEY_LENGTH } from '../idempotency.constants.js';

/** The outcome of reading a call's key: a key, no key, or why what was found is unusable. */
export type KeyReading =
  | { readonly kind: 'key'; readonly key: string }
  | { readonly kind: 'absent' }
  | { readonly kind: 'invalid'; readonly reason: string };

const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;

/**
 * Reads the key from the header's field lines. The draft defines the field as an RFC 8941
 * structured-field String (`"abc"`); most clients send a bare token (`abc`), so both are accepted
 * and mean the same key. Two field lines are refused rather than guessing which one is meant.
 *
 * @param fieldLines every value the header arrived with, one per field line, in order
 * @param name the header's name, for the reasons given (a route's `keyFrom: { header }`)
 */
export function readIdempotencyKey(
  fieldLines: readonly string[],
  name = 'Idempotency-Key',
): KeyReading {
  if (fieldLines.length === 0) return { kind: 'absent' };
  if (fieldLines.length > 1) {
    return { kind: 'invalid', reason: `The ${name} header must be sent once.` };
  }
  // Only SP and HTAB are optional whitespace (RFC 9110 §5.6.3). String#trim would also strip
  // U+00A0 and friends, which arrive here as obs-text bytes: "\xa0abc" must be refused, not read as
  // the key "abc" (a hostile-input property found this).
  const raw = fieldLines[0].replace(/^[ \t]+|[ \t]+$/g, '');
  if (!PRINTABLE_ASCII.test(raw)) {
    return { kind: 'invalid', reason: `The ${name} must be printable ASCII.` };
  }
  const parsed = raw.startsWith('"') ? parseStructuredString(raw, name) : { key: raw };
  if ('reason' in parsed) return { kind: 'invalid', reason: parsed.reason };
  if (parsed.key.length === 0) {
    return { kind: 'invalid', reason: `The ${name} must not be empty.` };
  }
  if (parsed.key.length > MAX_KEY_LENGTH) {
    return {
      kind: 'invalid',
      reason: `The ${name} must be at most ${MAX_KEY_LENGTH} characters long.`,
    };
  }
  return { kind: 'key', key: parsed.key };
}

/**
 * Reads a key that is a value rather than a header (a body field, an argument, a payload field, a
 * `keyFrom` function's result): `undefined`, `null` and `''` are no key; a string is taken as it
 * is (not parsed as an RFC 8941 string) and an integer as its decimal string, each 1–255
 * printable ASCII characters; anything else is refused.
 *
 * @param where what the value is, for the reason given (`"the body's data.object.id"`)
 */
export function readKeyValue(value: unknown, where: string): KeyReading {
  if (value === undefined || value === null || value === '') return { kind: 'absent' };
  let key: string;
  if (typeof value === 'string') key = value;
  else if (typeof value === 'number' && Number.isSafeInteger(value)) key = String(value);
  else return { kind: 'invalid', reason: `The key (${where}) must be a string or an integer.` };
  if (key.length > MAX_KEY_LENGTH)
    return {
      kind: 'invalid',
      reason: `The key (${where}) must be at most ${MAX_KEY_LENGTH} characters long.`,
    };
  if (!PRINTABLE_ASCII.test(key))
    return { kind: 'invalid', reason: `The key (${where}) must be printable ASCII.` };
  return { kind: 'key', key };
}

/**
 * The value at a dot path (`['data', 'object', 'id']`) in a parsed body, arguments or payload,
 * through own properties only; `undefined` where the path leads nowhere.
 */
export function valueAtPath(root: unknown, path: readonly string[]): unknown {
  let at = root;
  for (const segment of path) {
    if (typeof at !== 'object' || at === null || !Object.prototype.hasOwnProperty.call(at, segment))
      return undefined;
    at = (at as Record<string, unknown>)[segment];
  }
  return at;
}

/** RFC 8941 §4.2.5: a String is DQUOTE *(unescaped / "\" DQUOTE / "\\") DQUOTE, nothing after it. */
function parseStructuredString(raw: string, name: string): { key: string } | { reason: string } {
  const malformed = { reason: `The ${name} is a malformed quoted string.` };
  let key = '';
  for (let i = 1; i < raw.length; i++) {
    const char = raw[i];
    if (char === '\\') {
      const next = raw[++i];
      if (next !== '"' && next !== '\\') return malformed;
      key += next;
    } else if (char === '"') {
      return i === raw.length - 1 ? { key } : malformed;
    } else {
      key += char;
    }
  }
  return malformed;
}

/**
 * A key shortened for log lines: enough to correlate, too little to replay someone's request — its
 * first 8 characters, and never more than half of a shorter key (which would otherwise be logged
 * whole).
 */
export function truncateKeyForLog(key: string): string {
  return `${key.slice(0, Math.min(8, Math.floor(key.length / 2)))}…`;
}
