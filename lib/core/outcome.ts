import type { Outcome } from './types.js';

export type { Outcome };

/** The outcome of a handler's promise, never rejecting. */
export function settled(promise: Promise<unknown>): Promise<Outcome> {
  return promise.then(
    (value): Outcome => ({ ok: true, value }),
    (error: unknown): Outcome => ({ ok: false, error }),
  );
}
