import { Module } from '@nestjs/common';
import { GatewayWebhookSender } from './gateway-webhook.sender.js';
import { PaymentGatewayController } from './payment-gateway.controller.js';
import { PaymentGatewayService } from './payment-gateway.service.js';

@Module({
  controllers: [PaymentGatewayController],
  providers: [PaymentGatewayService, GatewayWebhookSender],
  exports: [PaymentGatewayService, GatewayWebhookSender],
})
export class PaymentGatewayModule {}
