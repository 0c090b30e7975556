import {
  BadRequestException,
  type CanActivate,
  type ExecutionContext,
  Inject,
  Injectable,
  type RawBodyRequest,
} from '@nestjs/common';
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';

/** The endpoint's secret, `whsec_` followed by the base64 of its key bytes. */
export const STANDARD_WEBHOOKS_SECRET = Symbol('StandardWebhooksSecret');

/** How far `webhook-timestamp` may be from now, as the specification recommends: 5 minutes. */
export const STANDARD_WEBHOOKS_TOLERANCE_SECONDS = 300;

/** The headers a Standard Webhooks sender sets on each delivery. */
export interface StandardWebhookHeaders {
  /** `webhook-id`: the message's id, the same on every retry of it: the idempotency key. */
  id: string;
  /** `webhook-timestamp`: unix seconds of this attempt. */
  timestamp: string;
  /** `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` (several while a key rolls). */
  signature: string;
}

/**
 * Verifies a Standard Webhooks delivery: the HMAC-SHA256 of `"<id>.<timestamp>.<raw body>"` under
 * the secret's key bytes (the base64 after `whsec_`), compared in constant time with each `v1`
 * signature, and a timestamp within `toleranceSeconds` of `now`. The `standardwebhooks` package's
 * `Webhook.verify()` does the same.
 */
export function verifyStandardWebhook(
  rawBody: Buffer,
  headers: StandardWebhookHeaders,
  secret: string,
  toleranceSeconds = STANDARD_WEBHOOKS_TOLERANCE_SECONDS,
  now = Date.now(),
): boolean {
  const { id, timestamp, signature } = headers;
  if (id === '' || !/^\d{1,12}$/.test(timestamp)) return false;
  if (Math.abs(now / 1000 - Number(timestamp)) > toleranceSeconds) return false;
  const key = Buffer.from(secret.replace(/^whsec_/, ''), 'base64');
  const expected = createHmac('sha256', key).update(`${id}.${timestamp}.`).update(rawBody).digest();
  return signature.split(' ').some((entry) => {
    const [version, value] = entry.split(',');
    if (version !== 'v1' || !value) return false;
    const candidate = Buffer.from(value, 'base64');
    return candidate.length === expected.length && timingSafeEqual(candidate, expected);
  });
}

/**
 * Lets a request through only if it carries a valid Standard Webhooks signature; runs before the
 * idempotency interceptor (a guard), needs `rawBody: true`. A refusal is a 400.
 */
@Injectable()
export class StandardWebhooksGuard implements CanActivate {
  constructor(@Inject(STANDARD_WEBHOOKS_SECRET) private readonly secret: string) {}

  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<RawBodyRequest<IncomingMessage>>();
    const [id, timestamp, signature] = ['webhook-id', 'webhook-timestamp', 'webhook-signature'].map(
      (name) => request.headers[name],
    );
    if (
      !request.rawBody ||
      typeof id !== 'string' ||
      typeof timestamp !== 'string' ||
      typeof signature !== 'string' ||
      !verifyStandardWebhook(request.rawBody, { id, timestamp, signature }, this.secret)
    ) {
      throw new BadRequestException({
        statusCode: 400,
        error: 'invalid_signature',
        message: 'The webhook-signature header does not match this message and secret.',
      });
    }
    return true;
  }
}
