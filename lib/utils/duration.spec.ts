import { MAX_TIMER_DELAY_MS, timerDelay, toMilliseconds } from './duration.js';

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
    ['30d', 2_592_000_000],
    ['365d', 31_536_000_000],
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

describe('durations beyond what a timer can wait', () => {
  it.each([['9'.repeat(400) + 'd'], [1e300], [Number.MAX_SAFE_INTEGER]])(
    'refuses %p at startup, naming the option',
    (input) => {
      expect(() => toMilliseconds(input, 'ttl')).toThrow(/ttl must be at most 100 years/);
    },
  );

  it("lets a timer wait at most Node's longest delay (2^31 - 1 ms, ~24.8 days)", () => {
    expect(MAX_TIMER_DELAY_MS).toBe(2 ** 31 - 1);
    expect(timerDelay(toMilliseconds('30d'))).toBe(MAX_TIMER_DELAY_MS);
    expect(timerDelay(1500)).toBe(1500);
  });
});
