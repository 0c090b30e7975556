import { ConfigurableModuleBuilder } from '@nestjs/common';
import type { IdempotencyModuleOptions } from './interfaces/idempotency-options.interface.js';

/**
 * `forRoot(options)` and `forRootAsync({ imports, inject, useFactory | useClass | useExisting })`.
 * The module is always global: `@Idempotent()` attaches the interceptor in whatever module the
 * controller lives, and the interceptor needs this module's providers there.
 */
const definition = new ConfigurableModuleBuilder<IdempotencyModuleOptions>()
  .setClassMethodName('forRoot')
  .setExtras({}, (module) => ({ ...module, global: true }))
  .build();

export const {
  ConfigurableModuleClass: ConfigurableIdempotencyModule,
  OPTIONS_TYPE,
  ASYNC_OPTIONS_TYPE,
} = definition;

/**
 * The injection token of the module's options as given to `forRoot` (or made by `forRootAsync`'s
 * factory), before defaults are applied: `@Inject(IDEMPOTENCY_MODULE_OPTIONS)`.
 */
export const IDEMPOTENCY_MODULE_OPTIONS = definition.MODULE_OPTIONS_TOKEN;
