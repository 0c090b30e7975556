import { SetMetadata } from '@nestjs/common';
import { validateRouteOptions } from '../idempotency.options.js';
import type { ScopeValue } from '../interfaces/idempotency-options.interface.js';
import type { IdempotentCallOptions } from './idempotency-runner.js';

/** Metadata key under which `@IdempotentMethod()` stores its options. */
export const IDEMPOTENT_METHOD_OPTIONS = 'IDEMPOTENCY:METHOD_OPTIONS';

/**
 * Options of `@IdempotentMethod()`: where the key comes from in the method's arguments, and the
 * options of `IdempotencyRunner.run` (each defaulting to the module's).
 */
export interface IdempotentMethodOptions<
  A extends unknown[] = unknown[],
> extends IdempotentCallOptions {
  /** The operation's key, from the method's arguments (e.g. `(command) => command.transferId`). */
  readonly key: (...args: A) => string | number;
  /**
   * The operation's name: keys are independent per name.
   * @default '<Class>.<method>'
   */
  readonly name?: string;
  /**
   * What is fingerprinted: another payload under a used key is refused with
   * `IdempotencyPayloadMismatchError`.
   * @default (...args) => args (every argument, as JSON)
   */
  readonly payload?: (...args: A) => unknown;
  /**
   * Whose key it is, from the arguments.
   * @default () => '' (one scope for everyone)
   */
  readonly scope?: (...args: A) => ScopeValue;
}

/**
 * Makes a provider's async method run once per key, through `IdempotencyRunner`: a CQRS command or
 * event handler's `execute`/`handle`, an event listener, a scheduled job, a service method. The
 * method is wrapped on its provider's instance when the app starts (`onModuleInit`), so every
 * call through the instance — Nest's buses and explorers, other providers, `this.method()` — goes
 * through it; an instance made with `new` outside Nest is not. Singleton providers only (refused
 * at startup on a request-scoped or transient one). For `@nestjs/bullmq` processors extend
 * `IdempotentWorkerHost` instead (their `process` is bound before the app starts).
 *
 * ```ts
 * @CommandHandler(TransferCommand)
 * export class TransferHandler implements ICommandHandler<TransferCommand> {
 *   @IdempotentMethod({ key: (command: TransferCommand) => command.transferId })
 *   async execute(command: TransferCommand) { ... }
 * }
 * ```
 */
export function IdempotentMethod<A extends unknown[]>(
  options: IdempotentMethodOptions<A>,
): <M extends (...args: A) => Promise<unknown>>(
  target: object,
  property: string | symbol,
  descriptor: TypedPropertyDescriptor<M>,
) => void {
  if (typeof options?.key !== 'function')
    throw new TypeError(
      '@IdempotentMethod() needs a `key`: a function of the arguments, e.g. { key: (command) => command.id }',
    );
  const { key: _key, name: _name, payload: _payload, scope: _scope, ...callOptions } = options;
  validateRouteOptions(callOptions);
  return (target, property, descriptor) => {
    SetMetadata(IDEMPOTENT_METHOD_OPTIONS, options)(target, property, descriptor);
  };
}
