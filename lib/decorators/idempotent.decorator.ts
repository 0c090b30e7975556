import { applyDecorators, SetMetadata, UseInterceptors } from '@nestjs/common';
import { IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import { IdempotencyInterceptor } from '../interceptors/idempotency.interceptor.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import { validateRouteOptions } from '../idempotency.options.js';

/**
 * Makes a route (or every route of a controller) safe to retry with an `Idempotency-Key` header.
 * Options are merged field by field: a method's over its controller's over the module's (a method
 * setting only `required: false` keeps its controller's `ttl`). Routes without it are untouched:
 * the interceptor is attached here, not globally.
 */
export function Idempotent(options: IdempotencyRouteOptions = {}) {
  validateRouteOptions(options);
  return applyDecorators(
    SetMetadata(IDEMPOTENT_ROUTE_OPTIONS, options),
    UseInterceptors(IdempotencyInterceptor),
  );
}
