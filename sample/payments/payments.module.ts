import { Module } from '@nestjs/common';
import { PaymentGatewayModule } from '../gateway/payment-gateway.module.js';
import { PaymentsController } from './payments.controller.js';
import { PaymentsResolver } from './payments.resolver.js';
import { PaymentsService } from './payments.service.js';

@Module({
  imports: [PaymentGatewayModule],
  controllers: [PaymentsController],
  providers: [PaymentsService, PaymentsResolver],
})
export class PaymentsModule {}
