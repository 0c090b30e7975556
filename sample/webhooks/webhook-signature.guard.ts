import {
  BadRequestException,
  type CanActivate,
  type ExecutionContext,
  type RawBodyRequest,
} from '@nestjs/common';
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http';

/** The HMAC-SHA256 under `key` of `prefix` followed by the raw body: what a sender signs. */
export function hmacSha256(key: string | Buffer, prefix: string, rawBody: Buffer): Buffer {
  return createHmac('sha256', key).update(prefix).update(rawBody).digest();
}

/** Whether `signature` is `expected`, compared in constant time; one of another length is not. */
export function signatureMatches(signature: Buffer, expected: Buffer): boolean {
  return signature.length === expected.length && timingSafeEqual(signature, expected);
}

/** Whether `timestamp` is unix seconds (1 to 12 digits) within `toleranceSeconds` of `now` (ms). */
export function isFreshTimestamp(
  timestamp: string,
  toleranceSeconds: number,
  now: number,
): boolean {
  return (
    /^\d{1,12}$/.test(timestamp) && Math.abs(now / 1000 - Number(timestamp)) <= toleranceSeconds
  );
}

/**
 * A guard that lets a request through only if its sender signed it: it runs before the idempotency
 * interceptor, so a forged or stale delivery never claims a key, never reads a stored response and
 * never runs the handler. It needs the raw body (`NestFactory.create(AppModule, { rawBody: true })`);
 * without it every request is refused. A refusal is a 400 `invalid_signature` saying `refusal`.
 * A subclass checks its sender's signature in `verify`.
 */
export abstract class WebhookSignatureGuard implements CanActivate {
  protected constructor(private readonly refusal: string) {}

  /** Whether the headers carry a valid signature of `rawBody`. */
  protected abstract verify(rawBody: Buffer, headers: IncomingHttpHeaders): boolean;

  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<RawBodyRequest<IncomingMessage>>();
    if (!request.rawBody || !this.verify(request.rawBody, request.headers)) {
      throw new BadRequestException({
        statusCode: 400,
        error: 'invalid_signature',
        message: this.refusal,
      });
    }
    return true;
  }
}
