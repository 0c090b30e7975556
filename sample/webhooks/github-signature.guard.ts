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
  const expected = createHmac('sha256', secret).update(rawBody).digest();
  return timingSafeEqual(Buffer.from(match[1], 'hex'), expected);
}

/**
 * Lets a request through only if GitHub signed it; runs before the idempotency interceptor (a
 * guard), needs `rawBody: true`. A refusal is a 400.
 */
@Injectable()
export class GitHubSignatureGuard implements CanActivate {
  constructor(@Inject(GITHUB_WEBHOOK_SECRET) private readonly secret: string) {}

  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<RawBodyRequest<IncomingMessage>>();
    const header = request.headers['x-hub-signature-256'];
    if (
      !request.rawBody ||
      typeof header !== 'string' ||
      !verifyGitHubSignature(request.rawBody, header, this.secret)
    ) {
      throw new BadRequestException({
        statusCode: 400,
        error: 'invalid_signature',
        message: 'The X-Hub-Signature-256 header does not match this body and secret.',
      });
    }
    return true;
  }
}
