import { Inject, Injectable, type OnModuleInit } from '@nestjs/common';
import { DiscoveryService, MetadataScanner } from '@nestjs/core';
import { IdempotencyStore } from '../storage/idempotency-store.interface.js';
import {
  IDEMPOTENT_METHOD_OPTIONS,
  type IdempotentMethodOptions,
} from './idempotent-method.decorator.js';
import { IdempotencyRunner } from './idempotency-runner.js';

/** The methods wrapped by an explorer (of any import of the module). */
const WRAPPED = new WeakSet<object>();

/**
 * Wraps every `@IdempotentMethod()` of the app's singleton providers (and controllers) on their
 * instance at startup, so each call runs through `IdempotencyRunner` (once: another import of the
 * module does not wrap it again). Refuses, at startup, one on a provider that is not a singleton,
 * a transactional one on a store without transactions, and two classes of one name whose methods
 * would share a default name (`Class.method`).
 */
@Injectable()
export class IdempotentMethodsExplorer implements OnModuleInit {
  constructor(
    private readonly discovery: DiscoveryService,
    private readonly scanner: MetadataScanner,
    private readonly runner: IdempotencyRunner,
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
  ) {}

  onModuleInit(): void {
    const wrappers = [...this.discovery.getProviders(), ...this.discovery.getControllers()];
    const seen = new Set<object>();
    /** The class each default name (`Class.method`) was given to: two classes must not share one. */
    const defaultNames = new Map<string, object>();
    for (const wrapper of wrappers) {
      const instance: unknown = wrapper.instance;
      // A factory's or a value's class is the instance's (`metatype` is the factory, or nothing).
      const metatype = wrapper.isNotMetatype
        ? instance !== null && typeof instance === 'object'
          ? (Object.getPrototypeOf(instance) as { constructor?: unknown } | null)?.constructor
          : undefined
        : wrapper.metatype;
      if (!metatype || typeof metatype !== 'function') continue;
      const prototype = metatype.prototype as Record<string, unknown> | undefined;
      if (!prototype) continue;
      const methods = this.scanner
        .getAllMethodNames(prototype)
        .filter((method) =>
          Reflect.hasMetadata(IDEMPOTENT_METHOD_OPTIONS, prototype[method] as object),
        );
      if (methods.length === 0) continue;
      const where = (method: string) => `${metatype.name}.${method}`;
      if (!wrapper.isDependencyTreeStatic() || wrapper.isTransient)
        throw new Error(
          `nestjs-idempotency: @IdempotentMethod() on ${where(methods[0])}, a provider that is not a singleton (request-scoped or transient): its instances are made per request, after startup, and are not wrapped. ` +
            'Put the method on a singleton provider, or call IdempotencyRunner.run() in it.',
        );
      if (!instance || typeof instance !== 'object' || seen.has(instance)) continue;
      seen.add(instance);
      for (const method of methods) {
        const name = where(method);
        const options = Reflect.getMetadata(
          IDEMPOTENT_METHOD_OPTIONS,
          prototype[method] as object,
        ) as IdempotentMethodOptions;
        if (options.name === undefined) {
          const other = defaultNames.get(name);
          if (other && other !== metatype)
            throw new Error(
              `nestjs-idempotency: two classes named ${metatype.name} have @IdempotentMethod() on ${method}: both would be the operation ${name}, sharing their keys (one's stored results replayed for the other). ` +
                `Give each a \`name\`, e.g. @IdempotentMethod({ name: 'invoices.${method}', key: ... }).`,
            );
          defaultNames.set(name, metatype);
        }
        this.wrap(instance as Record<string, unknown>, method, name, options);
      }
    }
  }

  private wrap(
    instance: Record<string, unknown>,
    method: string,
    name: string,
    options: IdempotentMethodOptions,
  ): void {
    const original = instance[method] as (...args: unknown[]) => Promise<unknown>;
    // Wrapped already, by the explorer of another import of the module: a second wrapper would
    // claim the key the first holds and wait for itself.
    if (WRAPPED.has(original)) return;
    if (options.transactional && !this.store.transaction)
      throw new Error(
        `nestjs-idempotency: @IdempotentMethod({ transactional: true }) on ${name}, but the store has no transactional mode. Use PostgreSQL, PGlite or MySQL/MariaDB through the TypeORM store, or drop \`transactional\`.`,
      );
    const compiled = this.runner.compile(options);
    const operation = options.name ?? name;
    const runner = this.runner;
    const wrapped = async function (this: unknown, ...args: unknown[]) {
      const { value } = await runner.runCompiled(
        {
          key: options.key(...args),
          name: operation,
          payload: options.payload ? options.payload(...args) : args,
          scope: options.scope?.(...args),
        },
        compiled,
        () => original.apply(this, args),
      );
      return value;
    };
    Object.defineProperty(wrapped, 'name', { value: method });
    // Nest's and other libraries' metadata stay readable on the wrapper.
    for (const metadataKey of Reflect.getMetadataKeys(original))
      Reflect.defineMetadata(metadataKey, Reflect.getMetadata(metadataKey, original), wrapped);
    WRAPPED.add(wrapped);
    instance[method] = wrapped;
  }
}
