import { describeScopeValue, scopeColumnValue } from './scope-value.js';

describe('scopeColumnValue', () => {
  it.each([
    ['alice', 'alice'],
    ['', ''],
    ['0b4c5a8e-9f6e-4f7e-8d4c-3a2b1c0d9e8f', '0b4c5a8e-9f6e-4f7e-8d4c-3a2b1c0d9e8f'],
    [42, '42'],
    [0, '0'],
    [-7, '-7'],
    [12345678901234567890n, '12345678901234567890'],
    [undefined, ''],
    [null, ''],
  ])('stores %p as %p', (value, scope) => {
    expect(scopeColumnValue(value)).toBe(scope);
  });

  it('makes 42, 42n and "42" one caller, and "042" another', () => {
    expect(new Set([42, 42n, '42'].map(scopeColumnValue))).toEqual(new Set(['42']));
    expect(scopeColumnValue('042')).not.toBe(scopeColumnValue(42));
  });

  it.each([
    [{ id: 1 }, 'an object'],
    [['a'], 'an array'],
    [Number.NaN, 'NaN'],
    [Number.POSITIVE_INFINITY, 'Infinity'],
    [true, 'a boolean'],
    [Symbol('s'), 'a symbol'],
    [() => 'x', 'a function'],
  ])('refuses %p (%s), which is no identity', (value, kind) => {
    expect(scopeColumnValue(value)).toBeUndefined();
    expect(describeScopeValue(value)).toBe(kind);
  });
});
