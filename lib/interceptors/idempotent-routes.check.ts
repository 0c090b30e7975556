import { Inject, Injectable, type OnModuleInit } from '@nestjs/common';
import {
  RESPONSE_PASSTHROUGH_METADATA,
  ROUTE_ARGS_METADATA,
  SSE_METADATA,
} from '@nestjs/common/constants.js';
import { RouteParamtypes } from '@nestjs/common/enums/route-paramtypes.enum.js';
import { DiscoveryService, MetadataScanner } from '@nestjs/core';
import { IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import { RESOLVED_OPTIONS, resolveRouteOptions, type ResolvedModuleOptions } from '../idempotency.options.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import { IdempotencyStore } from '../storage/idempotency-store.interface.js';

/**
 * Refuses, at startup, `@Idempotent()` routes whose response the interceptor can never see: a
 * handler that writes the response itself (`@Res()` / `@Next()` without `passthrough`) or streams
 * server-sent events. Left alone, such a route would look protected and run on every retry. Also
 * refuses transactional routes on a store that cannot run them (see `transactionsUnsupported`).
 */
@Injectable()
export class IdempotentRoutesCheck implements OnModuleInit {
  constructor(
    private readonly discovery: DiscoveryService,
    private readonly scanner: MetadataScanner,
    @Inject(RESOLVED_OPTIONS) private readonly options: ResolvedModuleOptions,
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
  ) {}

  onModuleInit(): void {
    const problems: string[] = [];
    const transactional: string[] = [];
    for (const wrapper of this.discovery.getControllers()) {
      const { instance, metatype } = wrapper;
      if (!instance || !metatype) continue;
      const prototype = Object.getPrototypeOf(instance);
      const classOptions: IdempotencyRouteOptions | undefined = Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, metatype);
      for (const method of this.scanner.getAllMethodNames(prototype)) {
        const handler = prototype[method];
        const handlerOptions: IdempotencyRouteOptions | undefined = Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, handler);
        if (!classOptions && !handlerOptions) continue;
        const reason = unsupportedReason(metatype, method, handler);
        if (reason) problems.push(`${metatype.name}.${method}: ${reason}`);
        // As the interceptor reads them: the method's options override the class's as a whole.
        if (resolveRouteOptions(this.options, handlerOptions ?? classOptions ?? {}).transactional) {
          transactional.push(`${metatype.name}.${method}`);
        }
      }
    }
    this.checkTransactional(transactional);
    if (problems.length > 0) {
      throw new Error(
        `nestjs-idempotency: @Idempotent() cannot protect these routes, because their response never passes through it:\n  ${problems.join('\n  ')}\nReturn the value instead (or use @Res({ passthrough: true })), or remove @Idempotent().`,
      );
    }
  }

  private checkTransactional(routes: string[]): void {
    if (routes.length === 0) return;
    const reason = this.store.transaction
      ? this.store.transactionsUnsupported?.()
      : 'the configured store has no transaction() method';
    if (reason) {
      throw new Error(
        `nestjs-idempotency: transactional routes (${routes.join(', ')}) cannot run on this store: ${reason}`,
      );
    }
  }
}

function unsupportedReason(controller: Function, method: string, handler: Function): string | undefined {
  if (Reflect.getMetadata(SSE_METADATA, handler)) return 'it streams server-sent events (@Sse())';
  const args: Record<string, unknown> = Reflect.getMetadata(ROUTE_ARGS_METADATA, controller, method) ?? {};
  const passthrough = Reflect.getMetadata(RESPONSE_PASSTHROUGH_METADATA, controller, method);
  for (const key of Object.keys(args)) {
    const type = Number(key.split(':')[0]);
    if (type === RouteParamtypes.NEXT) return 'it takes @Next()';
    if (type === RouteParamtypes.RESPONSE && !passthrough) {
      return 'it writes the response itself (@Res() without passthrough)';
    }
  }
  return undefined;
}
