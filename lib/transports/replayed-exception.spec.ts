import { Catch, HttpException, NotFoundException, UseFilters } from '@nestjs/common';
import { MAX_EXCEPTION_FIELDS_CHARS, ReplayedExceptions } from './replayed-exception.js';

class PaymentRequiredException extends HttpException {
  constructor(readonly reason: string) {
    super({ reason }, 402);
  }
}
class CardDeclinedException extends PaymentRequiredException {}

@Catch(PaymentRequiredException)
class PaymentRequiredFilter {
  catch() {}
}

class Controller {
  @UseFilters(PaymentRequiredFilter)
  pay() {}
  plain() {}
}
// The handlers are only references Nest's metadata is read from: they are never called.
// eslint-disable-next-line @typescript-eslint/unbound-method
const { pay, plain } = Controller.prototype;

/** A stored error's entry as another process (that never saw the class) reads it. */
function afterRestart(exception: HttpException): {
  entry: string | undefined;
  replayed: (handler: Function, globalFilters?: unknown[]) => HttpException;
} {
  const entry = new ReplayedExceptions(() => []).entryFor(exception);
  return {
    entry,
    replayed: (handler, globalFilters = []) =>
      new ReplayedExceptions(() => globalFilters).replayed(
        handler,
        Controller,
        entry,
        exception.getResponse(),
        exception.getStatus(),
      ),
  };
}

describe('ReplayedExceptions', () => {
  it('has nothing to restore for a plain HttpException', () => {
    expect(new ReplayedExceptions(() => []).entryFor(new HttpException('x', 409))).toBeUndefined();
  });

  it("replays a class the route's filter catches, with its fields, after a restart", () => {
    const { entry, replayed } = afterRestart(new PaymentRequiredException('no funds'));
    expect(JSON.parse(entry!)).toMatchObject({ classes: ['PaymentRequiredException'] });
    const exception = replayed(pay);
    expect(exception).toBeInstanceOf(PaymentRequiredException);
    expect((exception as PaymentRequiredException).reason).toBe('no funds');
    expect(exception.getStatus()).toBe(402);
    expect(exception.getResponse()).toEqual({ reason: 'no funds' });
    expect(exception.name).toBe('PaymentRequiredException');
  });

  it('replays a subclass as the parent its filter catches, under its own name', () => {
    const exception = afterRestart(new CardDeclinedException('declined')).replayed(pay);
    expect(exception).toBeInstanceOf(PaymentRequiredException);
    expect(exception.name).toBe('CardDeclinedException');
  });

  it("replays a class the app's filters catch (instances, as useGlobalFilters gives them)", () => {
    const exception = afterRestart(new PaymentRequiredException('x')).replayed(plain, [
      new PaymentRequiredFilter(),
    ]);
    expect(exception).toBeInstanceOf(PaymentRequiredException);
  });

  it("replays Nest's own exceptions as themselves, and a class nobody catches as HttpException", () => {
    expect(afterRestart(new NotFoundException('gone')).replayed(plain)).toBeInstanceOf(
      NotFoundException,
    );
    const unknown = afterRestart(new PaymentRequiredException('x')).replayed(plain);
    expect(unknown).not.toBeInstanceOf(PaymentRequiredException);
    expect(unknown).toBeInstanceOf(HttpException);
    expect((unknown as PaymentRequiredException).reason).toBe('x');
  });

  it('replays the class it captured in this process', () => {
    const exceptions = new ReplayedExceptions(() => []);
    const entry = exceptions.entryFor(new PaymentRequiredException('x'));
    expect(exceptions.replayed(plain, Controller, entry, {}, 402)).toBeInstanceOf(
      PaymentRequiredException,
    );
  });

  it('gives a Date field back as a Date', () => {
    class ExpiredException extends HttpException {
      constructor(readonly expiredAt: Date) {
        super('expired', 402);
      }
    }
    const at = new Date('2026-01-02T03:04:05.000Z');
    const exception = afterRestart(new ExpiredException(at)).replayed(plain) as ExpiredException;
    expect(exception.expiredAt).toBeInstanceOf(Date);
    expect(exception.expiredAt.toISOString()).toBe(at.toISOString());
  });

  it("does not name a class whose name the route's filters give to another class", () => {
    const namesake = () =>
      class PaymentRequiredException extends HttpException {
        constructor() {
          super('another module', 402);
        }
      };
    const Other = namesake();
    const exceptions = new ReplayedExceptions(() => []);
    const route = { handler: pay, controller: Controller };
    const entry = exceptions.entryFor(new Other(), route);
    const exception = exceptions.replayed(pay, Controller, entry, 'another module', 402);
    expect(exception).not.toBeInstanceOf(PaymentRequiredException);
    // Its own class, where no filter names another one.
    expect(exceptions.entryFor(new Other(), { handler: plain, controller: Controller })).toMatch(
      /PaymentRequiredException/,
    );
  });

  it('keeps the filters of each controller that shares a base class’s handler', () => {
    @UseFilters(PaymentRequiredFilter)
    class Filtered extends Controller {}
    const { entry } = afterRestart(new PaymentRequiredException('x'));
    const exceptions = new ReplayedExceptions(() => []);
    expect(exceptions.replayed(plain, Controller, entry, {}, 402)).not.toBeInstanceOf(
      PaymentRequiredException,
    );
    expect(exceptions.replayed(plain, Filtered, entry, {}, 402)).toBeInstanceOf(
      PaymentRequiredException,
    );
  });

  it('leaves out fields past the bound, keeping the class and the small fields', () => {
    class BatchException extends HttpException {
      constructor(
        readonly batch: string,
        readonly lines: string[],
      ) {
        super('refused', 409);
      }
    }
    const lines = Array.from({ length: 10_000 }, (_, i) => `line ${i}`);
    const { entry, replayed } = afterRestart(new BatchException('b-1', lines));
    expect(entry!.length).toBeLessThan(MAX_EXCEPTION_FIELDS_CHARS + 1024);
    const exception = replayed(plain) as BatchException;
    expect(exception.batch).toBe('b-1');
    expect(exception.lines).toBeUndefined();
    expect(exception.name).toBe('BatchException');
  });

  it('keeps the entry ASCII, and reads its fields back', () => {
    const { entry, replayed } = afterRestart(new PaymentRequiredException('refusé – 10 €'));
    expect(entry).toMatch(/^[\x20-\x7e]*$/);
    expect((replayed(pay) as PaymentRequiredException).reason).toBe('refusé – 10 €');
  });

  it('ignores a malformed entry, and never lets one set the prototype', () => {
    const exceptions = new ReplayedExceptions(() => []);
    expect(exceptions.replayed(pay, Controller, '{not json', 'x', 402)).toBeInstanceOf(
      HttpException,
    );
    const hostile = '{"classes":[],"fields":{"__proto__":{"polluted":true},"status":200}}';
    const exception = exceptions.replayed(pay, Controller, hostile, 'x', 402);
    expect(Object.getPrototypeOf(exception)).toBe(HttpException.prototype);
    expect(exception.getStatus()).toBe(402);
  });
});
