import { Body, Controller, Get, HttpCode, Post, UseGuards } from '@nestjs/common';
import { ApiHeader, ApiOkResponse, ApiTags } from '@nestjs/swagger';
import type { EntityManager } from 'typeorm';
import { Idempotent, IdempotentTransaction } from '../../lib/index.js';
import { GatewayEventDto } from './gateway-event.dto.js';
import {
  GatewayWebhooksService,
  type ReceivedEventView,
  type WebhookReceipt,
} from './gateway-webhooks.service.js';
import { StripeSignatureGuard } from './stripe-signature.guard.js';

/**
 * The shop's end of the gateway's webhooks. The gateway sends every event at least once: copies
 * at once, late copies, retries after any non-2xx. Each copy must get a 2xx (or it is sent again),
 * and the event must be acted on once.
 */
@ApiTags('webhooks')
@Controller('webhooks/gateway')
export class GatewayWebhooksController {
  constructor(private readonly webhooks: GatewayWebhooksService) {}

  /**
   * - The signature guard runs first: a forged event never reaches the idempotency lookup.
   * - The key is the event's `id`; the scope is none (the sender is no user of ours); the body is
   *   not fingerprinted (a sender may re-serialise an event between copies).
   * - `ttl: '3d'`: the record outlives the sender's retry window (Stripe retries for three days).
   * - `concurrency: 'wait'`: a copy that arrives while the first still runs waits for its answer
   *   and gets it (a 409 would only make the sender retry).
   * - `transactional`: the event's row and the stored answer commit together, so a crash
   *   mid-handler leaves nothing behind and the retry runs it as a first time.
   */
  @Post()
  @HttpCode(200)
  @UseGuards(StripeSignatureGuard)
  @Idempotent({
    keyFrom: { body: 'id' },
    scope: false,
    fingerprint: false,
    ttl: '3d',
    concurrency: 'wait',
    transactional: true,
  })
  @ApiHeader({
    name: 'Stripe-Signature',
    required: true,
    description: '`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`; else 400.',
  })
  @ApiOkResponse({ description: 'Received; every copy of an event gets its first answer.' })
  receive(
    @Body() event: GatewayEventDto,
    @IdempotentTransaction() manager: EntityManager,
  ): Promise<WebhookReceipt> {
    return this.webhooks.record(event, manager);
  }

  /** Every event the shop acted on: each event id once, with how many times its handler ran. */
  @Get('events')
  @ApiOkResponse({ description: 'Every event received, each once.' })
  events(): Promise<ReceivedEventView[]> {
    return this.webhooks.events();
  }
}
