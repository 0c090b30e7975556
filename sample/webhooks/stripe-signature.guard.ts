import { Inject, Injectable } from '@nestjs/common';
import type { IncomingHttpHeaders } from 'node:http';
import {
  hmacSha256,
  isFreshTimestamp,
  signatureMatches,
  WebhookSignatureGuard,
} from './webhook-signature.guard.js';

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
  if (!isFreshTimestamp(timestamp, toleranceSeconds, now)) return false;
  const expected = hmacSha256(secret, `${timestamp}.`, rawBody);
  return fields
    .filter(([name, value]) => name === 'v1' && value !== undefined && /^[0-9a-f]+$/i.test(value))
    .some(([, value]) => signatureMatches(Buffer.from(value, 'hex'), expected));
}

/**
 * Lets a request through only if Stripe signed it (see {@link WebhookSignatureGuard}): a forged or
 * stale event never claims a key. A refusal is a 400, which Stripe retries; the library stores
 * nothing for it.
 */
@Injectable()
export class StripeSignatureGuard extends WebhookSignatureGuard {
  constructor(@Inject(STRIPE_WEBHOOK_SECRET) private readonly secret: string) {
    super('The Stripe-Signature header does not match this body and secret.');
  }

  protected verify(rawBody: Buffer, headers: IncomingHttpHeaders): boolean {
    const header = headers['stripe-signature'];
    return typeof header === 'string' && verifyStripeSignature(rawBody, header, this.secret);
  }
}
