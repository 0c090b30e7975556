import { createParamDecorator, Injectable } from '@nestjs/common';
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash } from 'node:crypto';
import type { EntityManager } from 'typeorm';
import type { IdempotentOperation } from './core/types.js';

export type { IdempotentOperation };

const running = new AsyncLocalStorage<IdempotentOperation>();

/** Runs `work` as `operation`: the handler's code (and what it awaits) sees it in the context. */
export function runAsOperation<T>(
  operation: IdempotentOperation,
  work: () => Promise<T>,
): Promise<T> {
  return running.run(operation, work);
}

/**
 * A stable idempotency key for one downstream call of an operation: the same on every retry of the
 * operation (in any process, after a crash, after a takeover), different for each call name and for
 * each operation (scope, endpoint, key and payload). Shaped as a UUID (version 8, RFC 9562), which
 * every gateway that takes a key accepts.
 */
export function downstreamKeyOf(operation: IdempotentOperation, name: string): string {
  const hex = createHash('sha256')
    .update(
      JSON.stringify([
        'nestjs-idempotency/downstream/1',
        operation.scope,
        operation.endpoint,
        operation.key,
        operation.fingerprint,
        name,
      ]),
    )
    .digest('hex');
  const variant = ((parseInt(hex[16], 16) & 0x3) | 0x8).toString(16);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-8${hex.slice(13, 16)}-${variant}${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}

/**
 * What the running handler knows about its idempotent operation. Inject it anywhere (it is a
 * singleton; the operation comes from the async context of the request), or call
 * `IdempotencyContext.current()` outside dependency injection.
 *
 * ```ts
 * const charge = await gateway.charge(dto, { idempotencyKey: this.idempotency.downstreamKey('charge') });
 * ```
 */
@Injectable()
export class IdempotencyContext {
  /** The operation of the handler running now, or `undefined` outside an idempotent handler. */
  static current(): IdempotentOperation | undefined {
    return running.getStore();
  }

  /** See {@link IdempotencyContext.current}. */
  get operation(): IdempotentOperation | undefined {
    return running.getStore();
  }

  /**
   * The key to send with the downstream call `name` (e.g. `'charge'`, `'send-receipt'`): see
   * {@link downstreamKeyOf}. Throws outside an idempotent handler, where there is no operation to
   * derive it from.
   */
  downstreamKey(name: string): string {
    return downstreamKeyOf(this.require('a downstream key'), name);
  }

  /**
   * The EntityManager of the running transactional route: write through it, and the writes commit
   * together with the stored response. Throws elsewhere.
   */
  get entityManager(): EntityManager {
    const manager = this.require('a transaction').entityManager;
    if (!manager) {
      throw new Error(
        'nestjs-idempotency: this route is not transactional. Use @Idempotent({ transactional: true }) to get its EntityManager.',
      );
    }
    return manager;
  }

  private require(what: string): IdempotentOperation {
    const operation = running.getStore();
    if (!operation) {
      throw new Error(
        `nestjs-idempotency: ${what} exists only while an @Idempotent() handler runs for a key.`,
      );
    }
    return operation;
  }
}

const context = new IdempotencyContext();

/**
 * Parameter decorator: the EntityManager of a transactional route's transaction.
 *
 * ```ts
 * @Post() @Idempotent({ transactional: true })
 * transfer(@Body() dto: TransferDto, @IdempotentTransaction() manager: EntityManager) { ... }
 * ```
 */
export const IdempotentTransaction = createParamDecorator(() => context.entityManager);
