import {
  readIdempotencyKey,
  readKeyValue,
  truncateKeyForLog,
  valueAtPath,
} from './idempotency-key.js';

describe('readIdempotencyKey', () => {
  it('reads a bare token', () => {
    expect(readIdempotencyKey(['8e03978e-40d5-43e8-bc93-6894a57f9324'])).toEqual({
      kind: 'key',
      key: '8e03978e-40d5-43e8-bc93-6894a57f9324',
    });
  });

  it('reads a structured-field string as the same key as the bare token', () => {
    expect(readIdempotencyKey(['"abc-123"'])).toEqual(readIdempotencyKey(['abc-123']));
  });

  it('unescapes \\" and \\\\ in a quoted key', () => {
    expect(readIdempotencyKey(['"a\\"b\\\\c"'])).toEqual({ kind: 'key', key: 'a"b\\c' });
  });

  it('keeps case: keys are case-sensitive', () => {
    expect(readIdempotencyKey(['AbC'])).toEqual({ kind: 'key', key: 'AbC' });
  });

  it('reports an absent header', () => {
    expect(readIdempotencyKey([])).toEqual({ kind: 'absent' });
  });

  it.each([
    ['empty', ''],
    ['whitespace only', '   '],
    ['empty quoted', '""'],
    ['unterminated quote', '"abc'],
    ['text after the closing quote', '"abc"def'],
    ['a bad escape', '"a\\nb"'],
    ['a trailing backslash', '"abc\\'],
    ['control characters', 'abc\u0001def'],
    ['non-ASCII', 'clé'],
    ['a no-break space around the key (not optional whitespace)', '\u00a0abc\u00a0'],
    ['256 characters', 'k'.repeat(256)],
  ])('refuses %s', (_case, value) => {
    expect(readIdempotencyKey([value])).toMatchObject({ kind: 'invalid' });
  });

  it('strips spaces and tabs around the key', () => {
    expect(readIdempotencyKey([' \tabc\t '])).toEqual({ kind: 'key', key: 'abc' });
  });

  it('accepts 255 characters', () => {
    expect(readIdempotencyKey(['k'.repeat(255)])).toMatchObject({ kind: 'key' });
  });

  it('refuses the header sent twice, even with equal values', () => {
    expect(readIdempotencyKey(['a', 'a'])).toMatchObject({ kind: 'invalid' });
  });
});

describe('truncateKeyForLog', () => {
  it('keeps only the first 8 characters, and at most half of a short key', () => {
    expect(truncateKeyForLog('8e03978e-40d5-43e8')).toBe('8e03978e…');
    expect(truncateKeyForLog('16-characters-ok')).toBe('16-chara…');
    expect(truncateKeyForLog('8-chars!')).toBe('8-ch…');
    expect(truncateKeyForLog('short')).toBe('sh…');
    expect(truncateKeyForLog('k')).toBe('…');
  });
});

describe('readKeyValue (a key found in a body, arguments, a payload or by a function)', () => {
  it.each([undefined, null, ''])('reads %p as no key', (value) => {
    expect(readKeyValue(value, "the body's id")).toEqual({ kind: 'absent' });
  });

  it('takes a string as it is (no RFC 8941 parsing) and an integer as its decimal string', () => {
    expect(readKeyValue('"quoted"', 'x')).toEqual({ kind: 'key', key: '"quoted"' });
    expect(readKeyValue(42, 'x')).toEqual({ kind: 'key', key: '42' });
  });

  it.each([
    ['an object', { $gt: '' }],
    ['an array', ['a']],
    ['a boolean', true],
    ['a fraction', 1.5],
    ['an unsafe integer', 2 ** 60],
  ])('refuses %s, naming where it was found', (_case, value) => {
    const reading = readKeyValue(value, "the body's data.id");
    expect(reading).toMatchObject({ kind: 'invalid' });
    expect((reading as { reason: string }).reason).toMatch(
      /the body's data\.id.*string or an integer/,
    );
  });

  it('bounds it like a header key: 255 printable ASCII characters', () => {
    expect(readKeyValue('k'.repeat(255), 'x')).toMatchObject({ kind: 'key' });
    expect(readKeyValue('k'.repeat(256), 'x')).toMatchObject({ kind: 'invalid' });
    expect(readKeyValue('clé', 'x')).toMatchObject({ kind: 'invalid' });
    expect(readKeyValue('a\nb', 'x')).toMatchObject({ kind: 'invalid' });
  });
});

describe('valueAtPath', () => {
  it('follows own properties only', () => {
    expect(valueAtPath({ data: { object: { id: 'evt' } } }, ['data', 'object', 'id'])).toBe('evt');
    expect(valueAtPath({ items: ['a', 'b'] }, ['items', '1'])).toBe('b');
    expect(valueAtPath({}, ['toString'])).toBeUndefined();
    expect(valueAtPath({ data: 'text' }, ['data', 'length'])).toBeUndefined();
    expect(valueAtPath(undefined, ['id'])).toBeUndefined();
  });
});
