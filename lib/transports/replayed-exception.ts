import * as common from '@nestjs/common';
import { HttpException, Logger } from '@nestjs/common';
import { EXCEPTION_FILTERS_METADATA, FILTER_CATCH_EXCEPTIONS } from '@nestjs/common/constants.js';

/**
 * The entry of a stored error's headers that names its class and keeps its own fields: not a
 * header, never sent by a replay. (A version before it sends it as a header, harmlessly.)
 */
export const EXCEPTION_ENTRY = 'nestjs-idempotency-exception';

type HttpExceptionClass = abstract new (...args: never[]) => HttpException;

/**
 * What the entry holds: the class and its parents below HttpException, the instance's fields, and
 * which of those fields were Dates (their JSON is a string; a filter may call `toISOString()`).
 */
interface StoredException {
  readonly classes: readonly string[];
  readonly fields: Readonly<Record<string, unknown>>;
  readonly dates?: readonly string[];
  /** A domain error (not an HttpException) that `storeIf` stored: its message. */
  readonly message?: string;
}

type ErrorClass = abstract new (...args: never[]) => Error;

/** The route a stored error was thrown on: its handler and controller. */
export interface ExceptionRoute {
  readonly handler: Function;
  readonly controller: Function;
}

/**
 * The most characters of fields an entry keeps. Stored headers share one column, which holds
 * 64 KiB on MySQL/MariaDB (sealed, a third more): a larger entry would fail every completion and
 * leave the key locked until a retry ran the handler again. Fields past it are left out (logged).
 */
export const MAX_EXCEPTION_FIELDS_CHARS = 16 * 1024;

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
  /** Domain error classes stored by this process (`storeIf`). */
  private readonly capturedErrors = new Map<string, ErrorClass>();
  /** Per controller and handler: controllers sharing a base class's handler have their own filters. */
  private readonly caughtByRoute = new WeakMap<
    Function,
    WeakMap<Function, Map<string, HttpExceptionClass>>
  >();

  /** @param globalFilters the app's filters (`useGlobalFilters`, `APP_FILTER`), once it runs. */
  constructor(private readonly globalFilters: () => readonly unknown[]) {}

  /**
   * The entry for a thrown exception; `undefined` for a plain HttpException (nothing to restore).
   * A class whose name the route's filters give to another class (two `NotAllowedException`s of
   * two modules, an app's own `ConflictException`) is not named: a replay would reach the other
   * class's filter, which the first answer did not.
   */
  entryFor(exception: HttpException, route?: ExceptionRoute): string | undefined {
    const caught = route ? this.caughtBy(route.handler, route.controller) : undefined;
    const classes: string[] = [];
    for (
      let type = exception.constructor as HttpExceptionClass;
      type !== HttpException && type.prototype instanceof HttpException;
      type = Object.getPrototypeOf(type) as HttpExceptionClass
    ) {
      const namesake = caught?.get(type.name);
      if (namesake !== undefined && namesake !== type) continue;
      classes.push(type.name);
      if (!this.captured.has(type.name)) this.captured.set(type.name, type);
    }
    if (classes.length === 0) return undefined;
    return this.entryOf(exception, classes, route);
  }

  /**
   * The entry for a domain error that is not an HttpException (stored by `storeIf`): its class
   * and those above it below Error, its message and its own fields.
   */
  domainEntryFor(error: Error, route?: ExceptionRoute): string {
    const classes: string[] = [];
    for (
      let type = error.constructor as ErrorClass;
      typeof type === 'function' && type !== Error && type.prototype instanceof Error;
      type = Object.getPrototypeOf(type) as ErrorClass
    ) {
      classes.push(type.name);
      if (!this.capturedErrors.has(type.name)) this.capturedErrors.set(type.name, type);
    }
    return this.entryOf(error, classes, route, error.message);
  }

  private entryOf(
    exception: Error,
    classes: string[],
    route: ExceptionRoute | undefined,
    message?: string,
  ): string {
    const fields: Record<string, unknown> = {};
    const dates: string[] = [];
    const tooLarge: string[] = [];
    let room = MAX_EXCEPTION_FIELDS_CHARS;
    for (const [name, value] of Object.entries(exception)) {
      if (REBUILT_FIELDS.has(name)) continue;
      let json: string | undefined;
      try {
        json = JSON.stringify(value);
      } catch {
        // Not serialisable (a cycle, a BigInt): left out.
      }
      if (json === undefined) continue;
      const size = ascii(JSON.stringify(name)).length + ascii(json).length + 2;
      if (size > room) {
        tooLarge.push(name);
        continue;
      }
      room -= size;
      fields[name] = value;
      if (value instanceof Date && !Number.isNaN(value.getTime())) dates.push(name);
    }
    if (tooLarge.length > 0) {
      new Logger('Idempotency').warn(
        `The stored ${classes[0] ?? 'error'} of ${route ? `${route.controller.name}.${route.handler.name}` : 'a route'} leaves out its field(s) ${tooLarge.join(', ')} (over ${MAX_EXCEPTION_FIELDS_CHARS / 1024} KiB of fields): its replays are thrown without them. Its body is stored whole.`,
      );
    }
    const stored: StoredException = {
      classes,
      fields,
      ...(dates.length > 0 && { dates }),
      ...(message !== undefined && { message }),
    };
    // ASCII, so that a version that sends the entry as a header can.
    return ascii(JSON.stringify(stored));
  }

  /**
   * What a replay of a stored error throws: a domain error of its class (stored by `storeIf`), or
   * the HttpException `replayed` gives.
   */
  thrownAgain(
    handler: Function,
    controller: Function,
    entry: string | string[] | undefined,
    body: unknown,
    status: number,
  ): Error {
    if (typeof entry === 'string' && entry.includes('"message"')) {
      const stored = parseEntry(entry);
      if (stored?.message !== undefined)
        return this.replayedDomainError(handler, controller, stored);
    }
    return this.replayed(handler, controller, entry, body, status);
  }

  /** The exception a replay throws: of the stored class when it is known here, with its fields. */
  replayed(
    handler: Function,
    controller: Function,
    entry: string | string[] | undefined,
    body: unknown,
    status: number,
  ): HttpException {
    const stored = typeof entry === 'string' ? parseEntry(entry) : undefined;
    const exception = new HttpException(body as string | Record<string, unknown>, status);
    if (!stored) return exception;
    const caught = this.caughtBy(handler, controller);
    const known = (name: string) =>
      caught.get(name) ?? this.captured.get(name) ?? nestExceptions().get(name);
    const type = stored.classes.map(known).find((found) => found !== undefined);
    if (type) Object.setPrototypeOf(exception, type.prototype as HttpException);
    const dates = new Set(stored.dates);
    for (const [name, value] of Object.entries(stored.fields)) {
      if (REBUILT_FIELDS.has(name) || name === '__proto__') continue;
      Object.defineProperty(exception, name, {
        value: dates.has(name) && typeof value === 'string' ? new Date(value) : value,
        writable: true,
        enumerable: true,
        configurable: true,
      });
    }
    return exception;
  }

  /**
   * A stored domain error thrown again: of its class when a filter of the route or the app catches
   * it, or this process stored one of it, else a plain Error (which Nest answers with a 500, as it
   * answered the first call when no filter caught it).
   */
  private replayedDomainError(
    handler: Function,
    controller: Function,
    stored: StoredException,
  ): Error {
    const caught = this.caughtErrorsBy(handler, controller);
    const type = stored.classes
      .map((name) => caught.get(name) ?? this.capturedErrors.get(name))
      .find((found) => found !== undefined);
    const error = Object.create((type ?? Error).prototype as object) as Error;
    Object.defineProperty(error, 'message', {
      value: stored.message,
      writable: true,
      configurable: true,
    });
    const dates = new Set(stored.dates);
    for (const [name, value] of Object.entries(stored.fields)) {
      if (name === '__proto__' || name === 'message') continue;
      Object.defineProperty(error, name, {
        value: dates.has(name) && typeof value === 'string' ? new Date(value) : value,
        writable: true,
        enumerable: true,
        configurable: true,
      });
    }
    return error;
  }

  /** The error classes (other than HttpExceptions) the route's filters and the app's catch. */
  private caughtErrorsBy(handler: Function, controller: Function): Map<string, ErrorClass> {
    const caught = new Map<string, ErrorClass>();
    for (const candidate of this.caughtClasses(handler, controller)) {
      if (
        typeof candidate === 'function' &&
        candidate.prototype instanceof Error &&
        !caught.has(candidate.name)
      )
        caught.set(candidate.name, candidate as ErrorClass);
    }
    return caught;
  }

  /** Every class named by the `@Catch()` of the route's filters and the app's. */
  private caughtClasses(handler: Function, controller: Function): unknown[] {
    const filters = [
      ...((Reflect.getMetadata(EXCEPTION_FILTERS_METADATA, handler) as unknown[]) ?? []),
      ...((Reflect.getMetadata(EXCEPTION_FILTERS_METADATA, controller) as unknown[]) ?? []),
      ...this.globalFilters(),
    ];
    return filters.flatMap((filter) => {
      const type = typeof filter === 'function' ? filter : (filter as object)?.constructor;
      return ((type && Reflect.getMetadata(FILTER_CATCH_EXCEPTIONS, type)) as unknown[]) ?? [];
    });
  }

  /** The HttpException classes the route's filters (method, controller) and the app's catch. */
  private caughtBy(handler: Function, controller: Function): Map<string, HttpExceptionClass> {
    let routes = this.caughtByRoute.get(controller);
    if (!routes) this.caughtByRoute.set(controller, (routes = new WeakMap()));
    let caught = routes.get(handler);
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
      routes.set(handler, caught);
    }
    return caught;
  }
}

/** JSON text with every non-ASCII character escaped (`\u00e9`): the same JSON value. */
function ascii(json: string): string {
  return json.replace(
    /[\u007f-\uffff]/g,
    (char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
}

function parseEntry(entry: string): StoredException | undefined {
  try {
    const parsed = JSON.parse(entry) as Partial<StoredException> | null;
    if (!Array.isArray(parsed?.classes) || typeof parsed.fields !== 'object' || !parsed.fields)
      return undefined;
    return {
      classes: parsed.classes.filter((name) => typeof name === 'string'),
      fields: parsed.fields,
      dates: Array.isArray(parsed.dates)
        ? parsed.dates.filter((name) => typeof name === 'string')
        : undefined,
      message: typeof parsed.message === 'string' ? parsed.message : undefined,
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
