import { HttpException, HttpStatus, Inject, Injectable, Logger } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { DataSource } from 'typeorm';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import { GatewayCharge } from './gateway-charge.entity.js';
import { GatewayWebhookSender } from './gateway-webhook.sender.js';

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
 * Stands in for Stripe, Adyen & co. The money moves at once (a row in `gateway_charges`), and the
 * answer takes `gatewayLatencyMs` to come back: long enough for a client to time out and retry, or
 * for our process to die, while the customer has already been charged. Like Stripe, it honours an
 * `Idempotency-Key`: a charge sent again with the same key returns the first charge, and charges
 * nobody twice. The payments service sends one per payment operation (see PaymentsService).
 * Each charge also owes the shop a `charge.succeeded` webhook, written to the gateway's outbox
 * with the charge (see GatewayWebhookSender).
 */
@Injectable()
export class PaymentGatewayService {
  private readonly logger = new Logger('PaymentGateway');

  constructor(
    @Inject(SAMPLE_CONFIG) private readonly config: SampleConfig,
    @Inject(DataSource) private readonly dataSource: DataSource,
    private readonly webhooks: GatewayWebhookSender,
  ) {}

  async charge(request: ChargeRequest, idempotencyKey?: string): Promise<Charge> {
    if (request.source === DECLINED_SOURCE) {
      await sleep(this.config.gatewayLatencyMs);
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
    const charge =
      (idempotencyKey && (await this.chargeOf(idempotencyKey))) ||
      (await this.newCharge(request, idempotencyKey));
    await sleep(this.config.gatewayLatencyMs);
    return { id: charge.id, status: 'succeeded' };
  }

  /** Every charge the gateway made, oldest first: its dashboard. */
  charges(): Promise<GatewayCharge[]> {
    return this.dataSource
      .getRepository(GatewayCharge)
      .find({ order: { createdAt: 'ASC', id: 'ASC' } });
  }

  private chargeOf(idempotencyKey: string): Promise<GatewayCharge | null> {
    return this.dataSource.getRepository(GatewayCharge).findOneBy({ idempotencyKey });
  }

  private async newCharge(
    request: ChargeRequest,
    idempotencyKey: string | undefined,
  ): Promise<GatewayCharge> {
    const charge: GatewayCharge = {
      id: `ch_${randomUUID()}`,
      idempotencyKey: idempotencyKey ?? null,
      amount: request.amount,
      currency: request.currency,
      source: request.source,
      createdAt: new Date(),
    };
    try {
      await this.dataSource.transaction(async (manager) => {
        await manager.insert(GatewayCharge, charge);
        await this.webhooks.enqueue(manager, 'charge.succeeded', {
          id: charge.id,
          object: 'charge',
          amount: charge.amount,
          currency: charge.currency,
          status: 'succeeded',
        });
      });
    } catch (error) {
      // Two calls with one key at once: the unique key let one charge through; answer with it.
      const first = idempotencyKey ? await this.chargeOf(idempotencyKey) : null;
      if (!first) throw error;
      return first;
    }
    this.logger.log(
      `Charged ${request.amount} ${request.currency}: ${charge.id}${idempotencyKey ? ` (key ${idempotencyKey.slice(0, 8)}…)` : ''}`,
    );
    return charge;
  }
}
