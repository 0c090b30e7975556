/** A length of time: milliseconds as a number, or a string such as `'500ms'`, `'30s'`, `'1m'`, `'24h'`, `'7d'`. */
export type Duration = number | string;

const UNIT_MS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};

const DURATION_PATTERN = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$/;

/**
 * The longest duration accepted: 100 years. Longer is a mistake (`Number.MAX_SAFE_INTEGER` meant as
 * "forever"), and the end of a TTL that long would be past what the records' epoch-ms columns and
 * JavaScript's numbers hold exactly.
 */
const MAX_DURATION_MS = 36_525 * UNIT_MS.d;

/**
 * The longest delay Node's timers wait (2^31 - 1 ms, about 24.8 days): a longer one fires after
 * 1 ms, with a TimeoutOverflowWarning.
 */
export const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;

/**
 * A delay for `setTimeout`/`setInterval` from a duration of the options (e.g. `storeTimeout: '30d'`):
 * at most {@link MAX_TIMER_DELAY_MS}. A timer that waits only that long for a longer duration is as
 * good as one that never fires, which is what such a duration means.
 */
export function timerDelay(ms: number): number {
  return Math.min(ms, MAX_TIMER_DELAY_MS);
}

/**
 * Parses a {@link Duration} into whole milliseconds, at most 100 years. Throws on anything else,
 * so a typo in the module's options fails at startup instead of silently meaning "zero".
 */
export function toMilliseconds(duration: Duration, optionName = 'duration'): number {
  let ms: number | undefined;
  if (typeof duration === 'number') {
    if (Number.isFinite(duration) && duration >= 0) ms = Math.round(duration);
  } else if (typeof duration === 'string') {
    const match = DURATION_PATTERN.exec(duration.trim());
    if (match) ms = Math.round(Number(match[1]) * UNIT_MS[match[2]]);
  }
  if (ms !== undefined && ms <= MAX_DURATION_MS) return ms;
  if (ms !== undefined) {
    throw new TypeError(
      `nestjs-idempotency: ${optionName} must be at most 100 years ('36525d'); got ${JSON.stringify(duration)}`,
    );
  }
  throw new TypeError(
    `nestjs-idempotency: ${optionName} must be a non-negative number of milliseconds or a string like '30s', '1m', '24h'; got ${JSON.stringify(duration)}`,
  );
}
