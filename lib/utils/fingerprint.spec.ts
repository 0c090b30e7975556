import fc from 'fast-check';
import { createHash } from 'node:crypto';
import {
  canonicalJson,
  fingerprintOfValue,
  fingerprintRequest,
  MAX_JSON_DEPTH,
  type FileFingerprint,
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

/**
 * Fingerprints as 0.2 computed them (stored records carry these): each piece hashed by its own
 * `update`, now one string hashed at once.
 */
const PINNED_DIGESTS = {
  json: '822206ce0912dc76d6ddee2ffe8c3cb8c1dfcc792a1e55755076404a12703fc0',
  text: 'f73e97a9f6aa20e66ef6338e398fc545de56e18fbf5e4a59ca1272dec82aa2e9',
  buffer: '48f336e9a6d60fd4a9811eba1caa6386df3c3867edf2159c2458ec48eb1d57bf',
  files: '6e50b2352b69d103134926fd5ddf75244acff31b0e1eff2fbd4afd4f0d59cdbb',
  none: 'b48b09e4357f67826dd46b47d0184f77e7f05f354976f384dc038aa3bc1e597e',
  loneSurrogates: 'f2d18d89af398f47f8b66ca69053e5fcaf2e8e9118468561b4712c862cf9fa35',
  value: '3686cf306055babc62865038497bb48e21a4af9b5a3b3473ad84264e246862bc',
  noValue: '1c9b1adeb1eb9147522438a080aa08c6e8fd8ca74271b12f4b5e252698cccc0b',
  valueLoneSurrogates: 'a4bce0ff8001c0eab19e5847ce2b419f4445d0ed43ec4a48cfb61f20679a0981',
};

/** `fingerprintRequest` and `fingerprintOfValue` of 0.2, piece by piece, for the properties below. */
function fingerprintByPieces(
  method: string,
  url: string,
  body: string | Buffer | object,
  files?: readonly FileFingerprint[],
): string {
  const hash = createHash('sha256');
  hash.update(method.toUpperCase()).update('\n').update(url).update('\n');
  if (Buffer.isBuffer(body)) hash.update('buffer:').update(body);
  else if (typeof body === 'string') hash.update('text:').update(body);
  else hash.update('json:').update(canonicalJson(body) ?? '');
  if (files && files.length > 0) hash.update('\nfiles:').update(canonicalJson(files)!);
  return hash.digest('hex');
}

function fingerprintOfValueByPieces(endpoint: string, scope: string, ...value: [unknown?]): string {
  const hash = createHash('sha256')
    .update(value.length > 0 ? 'value\n' : 'none\n')
    .update(endpoint)
    .update('\n')
    .update(scope)
    .update('\n');
  if (value.length > 0) hash.update(canonicalJson(value[0]) ?? '');
  return hash.digest('hex');
}

describe('stored fingerprints stay valid', () => {
  it('gives the digests 0.2 stored', () => {
    const file = { field: 'file', name: 'a.txt', type: 'text/plain', sha256: 'ab'.repeat(32) };
    expect({
      json: fingerprintRequest({
        method: 'post',
        url: '/orders?x=1',
        body: { b: [1, 'é'], a: null },
      }),
      text: fingerprintRequest({ method: 'POST', url: '/notes', body: 'héllo \ud83d\ude00' }),
      buffer: fingerprintRequest({ method: 'PUT', url: '/blob', body: Buffer.from([0, 1, 255]) }),
      files: fingerprintRequest({
        method: 'POST',
        url: '/upload',
        body: { title: 't' },
        files: [file],
      }),
      none: fingerprintRequest({ method: 'POST', url: '/x', body: undefined }),
      loneSurrogates: fingerprintRequest({
        method: 'POST',
        url: '/a\ud800',
        body: '\udc00x\ud83d',
      }),
      value: fingerprintOfValue('POST /orders', 'user-1', { amount: 5 }),
      noValue: fingerprintOfValue('POST /orders', 'user-1'),
      valueLoneSurrogates: fingerprintOfValue('POST /a', 'u\ud800', '\udc00'),
    }).toEqual(PINNED_DIGESTS);
  });

  it('hashes the bytes the pieces gave, for any URL, body and files (lone surrogates included)', () => {
    const text = fc.string({ unit: 'binary' });
    const file = fc.record({ field: text, name: text, type: text, sha256: fc.string() });
    fc.assert(
      fc.property(
        fc.constantFrom('get', 'POST', 'Put'),
        text,
        fc.oneof(
          text,
          fc.uint8Array().map((bytes) => Buffer.from(bytes)),
          fc.jsonValue(),
        ),
        fc.option(fc.array(file, { maxLength: 3 }), { nil: undefined }),
        (method, url, body, files) => {
          const input = { method, url, body: body as object, files };
          expect(fingerprintRequest(input)).toBe(
            fingerprintByPieces(method, url, input.body, files),
          );
        },
      ),
    );
  });

  it("hashes the bytes the pieces gave for a route's fingerprint value, and for none", () => {
    const text = fc.string({ unit: 'binary' });
    fc.assert(
      fc.property(text, text, fc.jsonValue(), (endpoint, scope, value) => {
        expect(fingerprintOfValue(endpoint, scope, value)).toBe(
          fingerprintOfValueByPieces(endpoint, scope, value),
        );
        expect(fingerprintOfValue(endpoint, scope)).toBe(
          fingerprintOfValueByPieces(endpoint, scope),
        );
      }),
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
