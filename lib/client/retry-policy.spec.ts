import { execFileSync } from 'node:child_process';
import { isRetryableStatus, parseRetryAfter, retryDelay } from './retry-policy.js';

describe('retry policy of the outgoing client', () => {
  it('retries 409, 429 and every 5xx, and no other status', () => {
    const retried = [200, 201, 400, 402, 404, 409, 422, 429, 500, 502, 503, 504, 599].filter(
      isRetryableStatus,
    );
    expect(retried).toEqual([409, 429, 500, 502, 503, 504, 599]);
  });

  it('backs off exponentially with full jitter, capped at maxDelayMs', () => {
    const options = { baseDelayMs: 100, maxDelayMs: 1000, random: () => 0.5 };
    expect([1, 2, 3, 4, 5, 6].map((retry) => retryDelay(retry, undefined, options))).toEqual([
      50, 100, 200, 400, 500, 500,
    ]);
    expect(retryDelay(3, undefined, { ...options, random: () => 0 })).toBe(0);
    expect(retryDelay(3, undefined, { ...options, random: () => 0.999 })).toBe(399);
  });

  it('waits at least Retry-After, cut to maxDelayMs', () => {
    const options = { baseDelayMs: 100, maxDelayMs: 5000, random: () => 0.5 };
    expect(retryDelay(1, 2000, options)).toBe(2000);
    expect(retryDelay(6, 0, options)).toBe(1600);
    expect(retryDelay(1, 60_000, options)).toBe(5000);
  });

  it('reads Retry-After as seconds or as an HTTP-date', () => {
    const now = Date.parse('2026-11-29T12:00:00Z');
    expect(parseRetryAfter('3', now)).toBe(3000);
    expect(parseRetryAfter(' 0 ', now)).toBe(0);
    expect(parseRetryAfter('Sun, 29 Nov 2026 12:00:02 GMT', now)).toBe(2000);
    expect(parseRetryAfter('Sun, 29 Nov 2026 11:00:00 GMT', now)).toBe(0);
    expect(parseRetryAfter('soon', now)).toBeUndefined();
    expect(parseRetryAfter('-1', now)).toBeUndefined();
    expect(parseRetryAfter(null, now)).toBeUndefined();
  });

  it('reads the obsolete asctime HTTP-date, which names no zone, as GMT, in any local time zone', () => {
    // In a process of its own (the compiled module, as `npm test` builds it): jest's process.env
    // is a copy, so TZ cannot be changed for this one.
    const module = new URL('../../dist/lib/client/retry-policy.js', import.meta.url).href;
    const script = `
      const { parseRetryAfter } = await import(${JSON.stringify(module)});
      const now = Date.parse('2026-11-29T12:00:00Z');
      console.log(JSON.stringify([
        parseRetryAfter('Sun Nov 29 12:00:02 2026', now),
        parseRetryAfter('Sunday, 29-Nov-26 12:00:02 GMT', now),
        new Date().getTimezoneOffset(),
      ]));`;
    const output = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, TZ: 'Asia/Tokyo', NODE_OPTIONS: '' },
    });
    expect(JSON.parse(output.toString())).toEqual([2000, 2000, -540]);
  });
});
