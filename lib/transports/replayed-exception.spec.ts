import { Catch, HttpException, NotFoundException, UseFilters } from '@nestjs/common';
import { ReplayedExceptions } from './replayed-exception.js';

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
