import type { LoggerService } from '@nestjs/common';

export type Level = 'log' | 'error' | 'warn' | 'debug' | 'verbose' | 'fatal';

/** Keeps every line the app logs, at every level, with all its arguments (context, stack). */
export class CapturedLog implements LoggerService {
  readonly lines: { level: Level; context: string | undefined; text: string }[] = [];
  log = (...args: unknown[]) => this.add('log', args);
  error = (...args: unknown[]) => this.add('error', args);
  warn = (...args: unknown[]) => this.add('warn', args);
  debug = (...args: unknown[]) => this.add('debug', args);
  verbose = (...args: unknown[]) => this.add('verbose', args);
  fatal = (...args: unknown[]) => this.add('fatal', args);

  private add(level: Level, args: unknown[]) {
    const text = args
      .map((arg) =>
        typeof arg === 'string'
          ? arg
          : arg instanceof Error
            ? `${arg.message}\n${arg.stack}`
            : JSON.stringify(arg),
      )
      .join(' | ');
    // Nest passes the context (the Logger's name) last.
    const context =
      args.length > 1 && typeof args.at(-1) === 'string' ? (args.at(-1) as string) : undefined;
    this.lines.push({ level, context, text });
  }
}
