import { Inject, Injectable } from '@nestjs/common';
import type { IncomingHttpHeaders } from 'node:http';
import {
  hmacSha256,
  isFreshTimestamp,
  signatureMatches,
  WebhookSignatureGuard,
} from './webhook-signature.guard.js';

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
  if (id === '' || !isFreshTimestamp(timestamp, toleranceSeconds, now)) return false;
  const key = Buffer.from(secret.replace(/^whsec_/, ''), 'base64');
  const expected = hmacSha256(key, `${id}.${timestamp}.`, rawBody);
  return signature.split(' ').some((entry) => {
    const [version, value] = entry.split(',');
    return version === 'v1' && !!value && signatureMatches(Buffer.from(value, 'base64'), expected);
  });
}

/**
 * Lets a request through only if it carries a valid Standard Webhooks signature (see
 * {@link WebhookSignatureGuard}).
 */
@Injectable()
export class StandardWebhooksGuard extends WebhookSignatureGuard {
  constructor(@Inject(STANDARD_WEBHOOKS_SECRET) private readonly secret: string) {
    super('The webhook-signature header does not match this message and secret.');
  }

  protected verify(rawBody: Buffer, headers: IncomingHttpHeaders): boolean {
    const [id, timestamp, signature] = ['webhook-id', 'webhook-timestamp', 'webhook-signature'].map(
      (name) => headers[name],
    );
    return (
      typeof id === 'string' &&
      typeof timestamp === 'string' &&
      typeof signature === 'string' &&
      verifyStandardWebhook(rawBody, { id, timestamp, signature }, this.secret)
    );
  }
}
