import * as common from '@nestjs/common';
import { HttpException } from '@nestjs/common';
import { EXCEPTION_FILTERS_METADATA, FILTER_CATCH_EXCEPTIONS } from '@nestjs/common/constants.js';

/**
 * The entry of a stored error's headers that names its class and keeps its own fields: not a
 * header, never sent by a replay. (A version before it sends it as a header, harmlessly.)
 */
export const EXCEPTION_ENTRY = 'nestjs-idempotency-exception';

type HttpExceptionClass = abstract new (...args: never[]) => HttpException;

/** What the entry holds: the class and its parents below HttpException, the instance's fields. */
interface StoredException {
  readonly classes: readonly string[];
  readonly fields: Readonly<Record<string, unknown>>;
}

/** Own fields that HttpException's constructor sets again from the body and status. */
const REBUILT_FIELDS = new Set(['response', 'status', 'options', 'cause', 'errorCode']);

/** Nest's own HttpException classes (BadRequestException, NotFoundException, …), by name. */
let builtIns: Map<string, HttpExceptionClass> | undefined;

/**
 * The classes of the HttpExceptions a replay throws again, so that the exception filters catch
 * a replayed error as they caught the first answer (`@Catch(PaymentRequiredException)`), in this
 * process or after a restart. A stored error names its class and its parents; a replay takes the
 * first of them known here: a class the route's or the app's filters catch (read from their
 * `@Catch()` metadata), one captured by this app since it started, or one of Nest's own.
 */
export class ReplayedExceptions {
  private readonly captured = new Map<string, HttpExceptionClass>();
  private readonly caughtByRoute = new WeakMap<Function, Map<string, HttpExceptionClass>>();

  /** @param globalFilters the app's filters (`useGlobalFilters`, `APP_FILTER`), once it runs. */
  constructor(private readonly globalFilters: () => readonly unknown[]) {}

  /** The entry for a thrown exception; `undefined` for a plain HttpException (nothing to restore). */
  entryFor(exception: HttpException): string | undefined {
    const classes: string[] = [];
    for (
      let type = exception.constructor as HttpExceptionClass;
      type !== HttpException && type.prototype instanceof HttpException;
      type = Object.getPrototypeOf(type) as HttpExceptionClass
    ) {
      classes.push(type.name);
      if (!this.captured.has(type.name)) this.captured.set(type.name, type);
    }
    if (classes.length === 0) return undefined;
    const fields: Record<string, unknown> = {};
    for (const [name, value] of Object.entries(exception)) {
      if (REBUILT_FIELDS.has(name)) continue;
      try {
        if (JSON.stringify(value) !== undefined) fields[name] = value;
      } catch {
        // Not serialisable (a cycle, a BigInt): left out.
      }
    }
    // ASCII, so that a version that sends the entry as a header can.
    return JSON.stringify({ classes, fields } satisfies StoredException).replace(
      /[\u007f-\uffff]/g,
      (char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, '0')}`,
    );
  }

  /** The exception a replay throws: of the stored class when it is known here, with its fields. */
  replayed(
    handler: Function,
    controller: Function,
    entry: string | string[] | undefined,
    body: unknown,
    status: number,
  ): HttpException {
    const exception = new HttpException(body as string | Record<string, unknown>, status);
    const stored = typeof entry === 'string' ? parseEntry(entry) : undefined;
    if (!stored) return exception;
    const caught = this.caughtBy(handler, controller);
    const known = (name: string) =>
      caught.get(name) ?? this.captured.get(name) ?? nestExceptions().get(name);
    const type = stored.classes.map(known).find((found) => found !== undefined);
    if (type) Object.setPrototypeOf(exception, type.prototype);
    for (const [name, value] of Object.entries(stored.fields)) {
      if (REBUILT_FIELDS.has(name) || name === '__proto__') continue;
      Object.defineProperty(exception, name, {
        value,
        writable: true,
        enumerable: true,
        configurable: true,
      });
    }
    return exception;
  }

  /** The HttpException classes the route's filters (method, controller) and the app's catch. */
  private caughtBy(handler: Function, controller: Function): Map<string, HttpExceptionClass> {
    let caught = this.caughtByRoute.get(handler);
    if (!caught) {
      caught = new Map();
      const filters = [
        ...((Reflect.getMetadata(EXCEPTION_FILTERS_METADATA, handler) as unknown[]) ?? []),
        ...((Reflect.getMetadata(EXCEPTION_FILTERS_METADATA, controller) as unknown[]) ?? []),
        ...this.globalFilters(),
      ];
      for (const filter of filters) {
        const type = typeof filter === 'function' ? filter : (filter as object)?.constructor;
        const classes = (type && Reflect.getMetadata(FILTER_CATCH_EXCEPTIONS, type)) as
          unknown[] | undefined;
        for (const candidate of classes ?? []) {
          if (isHttpExceptionClass(candidate) && !caught.has(candidate.name))
            caught.set(candidate.name, candidate);
        }
      }
      this.caughtByRoute.set(handler, caught);
    }
    return caught;
  }
}

function parseEntry(entry: string): StoredException | undefined {
  try {
    const parsed = JSON.parse(entry) as Partial<StoredException> | null;
    if (!Array.isArray(parsed?.classes) || typeof parsed.fields !== 'object' || !parsed.fields)
      return undefined;
    return {
      classes: parsed.classes.filter((name) => typeof name === 'string'),
      fields: parsed.fields,
    };
  } catch {
    return undefined;
  }
}

function isHttpExceptionClass(value: unknown): value is HttpExceptionClass {
  return typeof value === 'function' && value.prototype instanceof HttpException;
}

function nestExceptions(): Map<string, HttpExceptionClass> {
  if (!builtIns) {
    const classes: unknown[] = Object.values(common);
    builtIns = new Map(
      classes.filter(isHttpExceptionClass).map((type) => [type.name, type] as const),
    );
  }
  return builtIns;
}
