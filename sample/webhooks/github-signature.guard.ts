import { Inject, Injectable } from '@nestjs/common';
import type { IncomingHttpHeaders } from 'node:http';
import { hmacSha256, signatureMatches, WebhookSignatureGuard } from './webhook-signature.guard.js';

/** The webhook's secret, as set in the repository's or the app's webhook settings. */
export const GITHUB_WEBHOOK_SECRET = Symbol('GitHubWebhookSecret');

/**
 * Checks `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>` under `secret`, in
 * constant time. GitHub signs no timestamp, so a replayed capture verifies: the idempotency key
 * (`X-GitHub-Delivery`) is what makes a replay harmless while its record lives.
 */
export function verifyGitHubSignature(rawBody: Buffer, header: string, secret: string): boolean {
  const match = /^sha256=([0-9a-f]{64})$/i.exec(header.trim());
  if (!match) return false;
  return signatureMatches(Buffer.from(match[1], 'hex'), hmacSha256(secret, '', rawBody));
}

/** Lets a request through only if GitHub signed it (see {@link WebhookSignatureGuard}). */
@Injectable()
export class GitHubSignatureGuard extends WebhookSignatureGuard {
  constructor(@Inject(GITHUB_WEBHOOK_SECRET) private readonly secret: string) {
    super('The X-Hub-Signature-256 header does not match this body and secret.');
  }

  protected verify(rawBody: Buffer, headers: IncomingHttpHeaders): boolean {
    const header = headers['x-hub-signature-256'];
    return typeof header === 'string' && verifyGitHubSignature(rawBody, header, this.secret);
  }
}
