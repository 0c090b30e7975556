import { Logger } from '@nestjs/common';

/** The levels the module logs at. */
export type QuietLogger = Pick<Logger, 'debug' | 'log' | 'warn' | 'error'>;

/**
 * A logger whose failures never change an outcome: a custom app logger that throws is ignored (and
 * told about once, on stderr, as a process warning).
 */
export function quietLogger(context: string): QuietLogger {
  const logger = new Logger(context);
  let warned = false;
  const quiet =
    (level: 'debug' | 'log' | 'warn' | 'error') =>
    (message: string): void => {
      try {
        logger[level](message);
      } catch (error) {
        if (warned) return;
        warned = true;
        process.emitWarning(
          `nestjs-idempotency: the app's logger threw (${(error as Error)?.message ?? String(error)}); its messages are dropped, requests go on.`,
        );
      }
    };
  return { debug: quiet('debug'), log: quiet('log'), warn: quiet('warn'), error: quiet('error') };
}
