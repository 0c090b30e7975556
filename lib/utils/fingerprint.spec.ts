import { canonicalJson, fingerprintRequest } from './fingerprint.js';

const base = { method: 'POST', url: '/payments', body: { amount: 10, currency: 'eur' } };

describe('fingerprintRequest', () => {
  it('ignores the key order of JSON objects, at every depth', () => {
    const reordered = {
      ...base,
      body: { currency: 'eur', amount: 10 },
    };
    expect(fingerprintRequest(reordered)).toBe(fingerprintRequest(base));
    expect(
      fingerprintRequest({ ...base, body: { a: { x: 1, y: [{ p: 1, q: 2 }] } } }),
    ).toBe(fingerprintRequest({ ...base, body: { a: { y: [{ q: 2, p: 1 }], x: 1 } } }));
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

  it('treats a missing body like an empty one consistently', () => {
    expect(fingerprintRequest({ ...base, body: undefined })).toBe(
      fingerprintRequest({ ...base, body: undefined }),
    );
  });
});
