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

/** The endpoint's signing secret (`whsec_…` in Stripe's dashboard): provide it under this token. */
export const STRIPE_WEBHOOK_SECRET = Symbol('StripeWebhookSecret');

/** How old a signature's timestamp may be, as Stripe's own libraries default to: 5 minutes. */
export const STRIPE_SIGNATURE_TOLERANCE_SECONDS = 300;

/**
 * Checks `Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` (several `v1` while a secret
 * rolls) against the HMAC of `"<t>.<raw body>"` under `secret`, in constant time, and refuses a
 * timestamp more than `toleranceSeconds` away from `now` (a replayed capture). With the `stripe`
 * package, `stripe.webhooks.constructEvent(rawBody, header, secret)` does the same.
 */
export function verifyStripeSignature(
  rawBody: Buffer,
  header: string,
  secret: string,
  toleranceSeconds = STRIPE_SIGNATURE_TOLERANCE_SECONDS,
  now = Date.now(),
): boolean {
  const fields = header.split(',').map((field) => field.trim().split('='));
  const timestamp = fields.find(([name]) => name === 't')?.[1] ?? '';
  if (!/^\d{1,12}$/.test(timestamp)) return false;
  if (Math.abs(now / 1000 - Number(timestamp)) > toleranceSeconds) return false;
  const expected = createHmac('sha256', secret).update(`${timestamp}.`).update(rawBody).digest();
  return fields
    .filter(([name, value]) => name === 'v1' && value !== undefined && /^[0-9a-f]+$/i.test(value))
    .some(([, value]) => {
      const signature = Buffer.from(value, 'hex');
      return signature.length === expected.length && timingSafeEqual(signature, expected);
    });
}

/**
 * Lets a request through only if Stripe signed it: a guard, so it runs before the idempotency
 * interceptor, and a forged or stale event never claims a key, never reads a stored response and
 * never runs the handler. It needs the raw body: `NestFactory.create(AppModule, { rawBody: true })`.
 * A refusal is a 400, which Stripe retries; the library stores nothing for it.
 */
@Injectable()
export class StripeSignatureGuard implements CanActivate {
  constructor(@Inject(STRIPE_WEBHOOK_SECRET) private readonly secret: string) {}

  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<RawBodyRequest<IncomingMessage>>();
    const header = request.headers['stripe-signature'];
    if (
      !request.rawBody ||
      typeof header !== 'string' ||
      !verifyStripeSignature(request.rawBody, header, this.secret)
    ) {
      throw new BadRequestException({
        statusCode: 400,
        error: 'invalid_signature',
        message: 'The Stripe-Signature header does not match this body and secret.',
      });
    }
    return true;
  }
}
