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
 * Parses a {@link Duration} into whole milliseconds. Throws on anything else, so a typo in the
 * module's options fails at startup instead of silently meaning "zero".
 */
export function toMilliseconds(duration: Duration, optionName = 'duration'): number {
  if (typeof duration === 'number') {
    if (Number.isFinite(duration) && duration >= 0) return Math.round(duration);
  } else {
    const match = DURATION_PATTERN.exec(duration.trim());
    if (match) return Math.round(Number(match[1]) * UNIT_MS[match[2]]);
  }
  throw new TypeError(
    `nestjs-idempotency: ${optionName} must be a non-negative number of milliseconds or a string like '30s', '1m', '24h'; got ${JSON.stringify(duration)}`,
  );
}
