import { Module } from '@nestjs/common';
import { PaymentGatewayModule } from '../gateway/payment-gateway.module.js';
import { PaymentsController } from './payments.controller.js';
import { PaymentsService } from './payments.service.js';

@Module({
  imports: [PaymentGatewayModule],
  controllers: [PaymentsController],
  providers: [PaymentsService],
})
export class PaymentsModule {}
