import { type CanActivate, type ExecutionContext, Injectable } from '@nestjs/common';
import type { Request } from 'express';

/**
 * TEMPORARY, until `@Idempotent({ keyFrom: { body: 'id' } })` lands: hands the event's `id` to
 * the library as the request's Idempotency-Key.
 */
@Injectable()
export class EventIdAsKeyGuard implements CanActivate {
  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<Request>();
    const id: unknown = (request.body as { id?: unknown } | undefined)?.id;
    if (typeof id === 'string' && id !== '') {
      request.headers['idempotency-key'] = id;
      request.rawHeaders.push('Idempotency-Key', id);
    }
    return true;
  }
}
