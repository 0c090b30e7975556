import { toMilliseconds } from './duration.js';

describe('toMilliseconds', () => {
  it.each([
    [250, 250],
    ['500ms', 500],
    ['30s', 30_000],
    ['1m', 60_000],
    ['24h', 86_400_000],
    ['7d', 604_800_000],
    ['1.5s', 1500],
    [' 2h ', 7_200_000],
  ])('%p is %p ms', (input, expected) => {
    expect(toMilliseconds(input)).toBe(expected);
  });

  it.each(['', '10', '1 week', '-1s', 'h', '1x'])('refuses %p', (input) => {
    expect(() => toMilliseconds(input, 'ttl')).toThrow(/ttl must be/);
  });

  it.each([-1, Number.NaN, Number.POSITIVE_INFINITY])('refuses the number %p', (input) => {
    expect(() => toMilliseconds(input)).toThrow(TypeError);
  });
});
