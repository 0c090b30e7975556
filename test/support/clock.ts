import { jest } from '@jest/globals';

/**
 * The module reads time from the app server's `Date.now()` (the claim's `now`, the lock's and the
 * TTL's end, the purge's cut-off; never the database's clock), so freezing `Date` in this process
 * puts a request at any millisecond we choose. Every other timer stays real: timeouts, polling and
 * the database drivers run as usual. `jest.useRealTimers()` thaws it.
 */
const REAL_TIMERS = [
  'hrtime',
  'nextTick',
  'performance',
  'queueMicrotask',
  'requestAnimationFrame',
  'cancelAnimationFrame',
  'requestIdleCallback',
  'cancelIdleCallback',
  'setImmediate',
  'clearImmediate',
  'setInterval',
  'clearInterval',
  'setTimeout',
  'clearTimeout',
] as const;

export const freezeClockAt = (epochMs: number) =>
  jest.useFakeTimers({ doNotFake: [...REAL_TIMERS], now: epochMs });
export const setClock = (epochMs: number) => jest.setSystemTime(epochMs);
