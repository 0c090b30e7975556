import type { KeyEvent, KeyEventListener } from '../core/key-events.js';
import type { RecordId } from '../storage/idempotency-store.interface.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { quietLogger, type QuietLogger } from '../utils/quiet-logger.js';

/**
 * The log lines of the key's events: only what went wrong (warnings and errors) and two debug
 * lines (a duplicate that waits, a late claim released). The key is truncated, bodies never logged.
 */
export function logKeyEvents(logger: QuietLogger = quietLogger('Idempotency')): KeyEventListener {
  return (event: KeyEvent) => {
    switch (event.type) {
      case 'waiting':
        logger.debug(
          `Key ${describe(event.id)} is in progress; waiting up to ${event.remainingMs} ms`,
        );
        return;
      case 'late-claim-released':
        logger.debug(
          `The claim on key ${describe(event.id)} landed after its request was refused (the store did not answer within storeTimeout); released.`,
        );
        return;
      case 'unreadable':
        logger.error(
          `The stored response of key ${describe(event.id)} cannot be replayed: ${event.reason}. Answered with a 500 problem; the handler was not run again.`,
        );
        return;
      case 'lease-lost':
        logger.warn(
          `Key ${describe(event.id)} was taken over by another request after its claim went unrenewed for lockTimeout; ${event.consequence}.`,
        );
        return;
      case 'renewal-failed':
        logger.warn(
          `Could not renew the claim on key ${describe(event.id)}; trying again at the next beat: ${messageOf(event.error)}`,
        );
        return;
      case 'renewal-lapsed':
        logger.error(
          `The claim on key ${describe(event.id)} could not be renewed for lockTimeout (${event.lockTimeoutMs} ms): the store did not answer. A retry may take the key over and run the handler again; this request's result is stored only if its claim is still held. Still trying to renew it.`,
        );
        return;
      case 'renewal-limit':
        logger.error(
          `Key ${describe(event.id)} has run for lockRenewalLimit (${event.lockRenewalLimitMs} ms) and is presumed hung: its claim is no longer renewed, and a retry can take it over ${event.lockTimeoutMs} ms after the last renewal.`,
        );
        return;
      case 'write-failed':
        logger.error(
          `Could not ${event.what} key ${describe(event.id)} after ${event.attempts} attempts; it stays locked until its lock timeout, after which a retry runs the handler again: ${messageOf(event.error)}`,
        );
        return;
      case 'commit-answer-lost':
        logger.warn(
          `Key ${describe(event.id)} was completed by a transaction whose COMMIT's answer was lost; its response is stored, and a retry replays it.`,
        );
        return;
      case 'connection-lost':
        logger.warn(
          `The database connection of transactional key ${describe(event.id)} failed while it ran (${messageOf(event.cause)}); nothing was committed, answered as the store being unavailable.`,
        );
        return;
      default:
        return;
    }
  };
}

function describe(id: RecordId): string {
  return `${truncateKeyForLog(id.key)} on ${id.endpoint}`;
}

function messageOf(error: unknown): string | undefined {
  return (error as Error | undefined)?.message;
}
