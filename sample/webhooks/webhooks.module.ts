import { Module } from '@nestjs/common';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import { GatewayWebhooksController } from './gateway-webhooks.controller.js';
import { GatewayWebhooksService } from './gateway-webhooks.service.js';
import { STRIPE_WEBHOOK_SECRET, StripeSignatureGuard } from './stripe-signature.guard.js';

/** The shop's webhook receiver for the (simulated, Stripe-like) gateway. */
@Module({
  controllers: [GatewayWebhooksController],
  providers: [
    GatewayWebhooksService,
    StripeSignatureGuard,
    {
      provide: STRIPE_WEBHOOK_SECRET,
      inject: [SAMPLE_CONFIG],
      useFactory: (config: SampleConfig) => config.webhookSecret,
    },
  ],
})
export class WebhooksModule {}
