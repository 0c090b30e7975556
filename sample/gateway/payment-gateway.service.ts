import { HttpException, HttpStatus, Inject, Injectable, Logger } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';

export interface ChargeRequest {
  amount: number;
  currency: string;
  source: string;
}

export interface Charge {
  id: string;
  status: 'succeeded';
}

/** The card token that the simulated gateway always declines. */
export const DECLINED_SOURCE = 'card_declined';

/**
 * Stands in for Stripe, Adyen & co: it answers after `gatewayLatencyMs`, long enough for a client
 * to time out and retry while the money has already moved. That window is what idempotency keys
 * are for. Every call here is a real charge as far as the customer is concerned.
 */
@Injectable()
export class PaymentGatewayService {
  private readonly logger = new Logger('PaymentGateway');

  constructor(@Inject(SAMPLE_CONFIG) private readonly config: SampleConfig) {}

  async charge(request: ChargeRequest): Promise<Charge> {
    await sleep(this.config.gatewayLatencyMs);
    if (request.source === DECLINED_SOURCE) {
      // A business outcome, not a failure: the library stores this 402 and replays it, so a retry
      // with the same key does not ask the bank again.
      throw new HttpException(
        {
          statusCode: HttpStatus.PAYMENT_REQUIRED,
          error: 'card_declined',
          message: 'The card was declined.',
          decline_code: 'generic_decline',
        },
        HttpStatus.PAYMENT_REQUIRED,
      );
    }
    const charge: Charge = { id: `ch_${randomUUID()}`, status: 'succeeded' };
    this.logger.debug(`Charged ${request.amount} ${request.currency} to ${request.source}: ${charge.id}`);
    return charge;
  }
}
