import { Controller, Get } from '@nestjs/common';
import { GatewayWebhookSender, type WebhookEventView } from './gateway-webhook.sender.js';
import { PaymentGatewayService } from './payment-gateway.service.js';

/** The simulated gateway's dashboard: what the card network really charged. */
@Controller('gateway')
export class PaymentGatewayController {
  constructor(
    private readonly gateway: PaymentGatewayService,
    private readonly webhooks: GatewayWebhookSender,
  ) {}

  @Get('charges')
  async charges() {
    const charges = await this.gateway.charges();
    return charges.map((charge) => ({
      id: charge.id,
      idempotency_key: charge.idempotencyKey,
      amount: charge.amount,
      currency: charge.currency,
      created_at: charge.createdAt.toISOString(),
    }));
  }

  /** Every webhook event the gateway owes the shop, with each copy it sent and the answer. */
  @Get('webhooks')
  webhookEvents(): Promise<WebhookEventView[]> {
    return this.webhooks.events();
  }
}
