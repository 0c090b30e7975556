import { Module } from '@nestjs/common';
import { PaymentGatewayService } from './payment-gateway.service.js';

@Module({
  providers: [PaymentGatewayService],
  exports: [PaymentGatewayService],
})
export class PaymentGatewayModule {}
