import fc from 'fast-check';
import {
  canonicalJson,
  fingerprintOfValue,
  fingerprintRequest,
  MAX_JSON_DEPTH,
} from './fingerprint.js';

/** The canonical form as version 0.1 computed it: stored fingerprints were made with this. */
function canonicalJsonOfVersion01(value: unknown): string | undefined {
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

describe('canonicalJson', () => {
  it('is byte for byte the form fingerprints were stored with, for any JSON body', () => {
    const key = fc.oneof(
      fc.string(),
      fc.constantFrom(
        '__proto__',
        '0',
        '1',
        '10',
        '9',
        '01',
        '-1',
        '4294967295',
        '4294967294',
        'constructor',
      ),
    );
    const body = fc.letrec((tie) => ({
      value: fc.oneof(
        { depthSize: 'small' },
        fc.jsonValue(),
        fc.array(tie('value'), { maxLength: 4 }),
        fc.dictionary(key, tie('value'), { maxKeys: 6 }),
      ),
    })).value;
    fc.assert(
      fc.property(body, (value) =>
        expect(canonicalJson(value)).toBe(canonicalJsonOfVersion01(value)),
      ),
      { numRuns: 2000 },
    );
  });

  it.each([
    ['integer-like keys', { b: 1, 10: 2, 9: 3, a: 4 }],
    ['an own __proto__ key', JSON.parse('{"z":1,"__proto__":{"x":1},"a":2}')],
    [
      'values JSON drops or nulls',
      { a: undefined, b: () => 1, c: [undefined, NaN, Infinity, -0], d: null },
    ],
    ['a Date', { at: new Date(0) }],
  ])('matches for %s', (_case, value) => {
    expect(canonicalJson(value)).toBe(canonicalJsonOfVersion01(value));
  });
});

const base = { method: 'POST', url: '/payments', body: { amount: 10, currency: 'eur' } };

describe('fingerprintRequest', () => {
  it('ignores the key order of JSON objects, at every depth', () => {
    const reordered = {
      ...base,
      body: { currency: 'eur', amount: 10 },
    };
    expect(fingerprintRequest(reordered)).toBe(fingerprintRequest(base));
    expect(fingerprintRequest({ ...base, body: { a: { x: 1, y: [{ p: 1, q: 2 }] } } })).toBe(
      fingerprintRequest({ ...base, body: { a: { y: [{ q: 2, p: 1 }], x: 1 } } }),
    );
  });

  it.each([
    ['the body', { ...base, body: { amount: 11, currency: 'eur' } }],
    ['the array order', { ...base, body: [1, 2] }],
    ['the method', { ...base, method: 'PUT' }],
    ['the URL', { ...base, url: '/payments?dry_run=1' }],
    ['a string body with the same text as the JSON', { ...base, body: canonicalJson(base.body) }],
  ])('changes with %s', (_what, other) => {
    expect(fingerprintRequest(other)).not.toBe(fingerprintRequest(base));
  });

  it('hashes Buffers by their bytes', () => {
    const a = fingerprintRequest({ ...base, body: Buffer.from('abc') });
    expect(fingerprintRequest({ ...base, body: Buffer.from('abc') })).toBe(a);
    expect(fingerprintRequest({ ...base, body: Buffer.from('abd') })).not.toBe(a);
  });

  it('adds uploaded files by field, name, type and digest, and leaves requests without any as they were', () => {
    const file = { field: 'file', name: 'a.txt', type: 'text/plain', sha256: 'ab'.repeat(32) };
    const withFile = fingerprintRequest({ ...base, files: [file] });
    expect(fingerprintRequest({ ...base, files: [] })).toBe(fingerprintRequest(base));
    expect(withFile).not.toBe(fingerprintRequest(base));
    expect(fingerprintRequest({ ...base, files: [{ ...file }] })).toBe(withFile);
    for (const changed of [{ field: 'other' }, { name: 'b.txt' }, { sha256: 'cd'.repeat(32) }]) {
      expect(fingerprintRequest({ ...base, files: [{ ...file, ...changed }] })).not.toBe(withFile);
    }
  });

  it('treats a missing body like an empty one consistently', () => {
    expect(fingerprintRequest({ ...base, body: undefined })).toBe(
      fingerprintRequest({ ...base, body: undefined }),
    );
  });
});

describe('nesting depth', () => {
  const nested = (depth: number): unknown => {
    let value: unknown = 0;
    for (let i = 0; i < depth; i++) value = i % 2 ? [value] : { a: value };
    return value;
  };

  it(`fingerprints JSON nested ${MAX_JSON_DEPTH} levels deep and refuses one level more`, () => {
    expect(canonicalJson(nested(MAX_JSON_DEPTH))).toBe(JSON.stringify(nested(MAX_JSON_DEPTH)));
    expect(() => canonicalJson(nested(MAX_JSON_DEPTH + 1))).toThrow(RangeError);
    expect(() =>
      fingerprintRequest({ method: 'POST', url: '/', body: nested(MAX_JSON_DEPTH + 1) }),
    ).toThrow(`JSON nested deeper than ${MAX_JSON_DEPTH} levels`);
  });
});

describe('fingerprintOfValue (a route with a fingerprint option)', () => {
  it('is the value canonicalised, bound to the endpoint and the scope', () => {
    const one = fingerprintOfValue('POST /charges', 'u1', { b: 1, a: 2 });
    expect(fingerprintOfValue('POST /charges', 'u1', { a: 2, b: 1 })).toBe(one);
    expect(fingerprintOfValue('POST /refunds', 'u1', { a: 2, b: 1 })).not.toBe(one);
    expect(fingerprintOfValue('POST /charges', 'u2', { a: 2, b: 1 })).not.toBe(one);
    expect(fingerprintOfValue('POST /charges', 'u1', { a: 3, b: 1 })).not.toBe(one);
  });

  it('without a value (fingerprint: false) differs from any value, undefined included', () => {
    const none = fingerprintOfValue('POST /hooks', '');
    expect(fingerprintOfValue('POST /hooks', '')).toBe(none);
    expect(fingerprintOfValue('POST /hooks', '', undefined)).not.toBe(none);
    expect(fingerprintOfValue('POST /hooks', '', null)).not.toBe(none);
  });
});
