import { Args, Mutation, Query, Resolver } from '@nestjs/graphql';
import { Idempotent } from '../../lib/index.js';
import { CreatePaymentArgs } from './create-payment.dto.js';
import { PaymentsService, type PaymentView } from './payments.service.js';

/** The payments API over GraphQL (schema first): the same service, the same idempotency. */
export const PAYMENTS_GRAPHQL_SCHEMA = /* GraphQL */ `
  type Payment {
    id: ID!
    amount: Int!
    currency: String!
    source: String!
    status: String!
    reference: String
    created_at: String!
  }
  type Query {
    payments: [Payment!]!
  }
  type Mutation {
    "Charges once per idempotencyKey (or Idempotency-Key header); a retry gets the first payment."
    createPayment(
      amount: Int!
      currency: String!
      source: String!
      reference: String
      idempotencyKey: String
    ): Payment!
  }
`;

@Resolver()
export class PaymentsResolver {
  constructor(private readonly payments: PaymentsService) {}

  @Query('payments')
  list(): Promise<PaymentView[]> {
    return this.payments.list();
  }

  /** As `POST /payments`: a duplicate in flight waits for the first and gets its payment. */
  @Mutation('createPayment')
  @Idempotent({ concurrency: 'wait' })
  create(@Args() payment: CreatePaymentArgs): Promise<PaymentView> {
    return this.payments.create(payment.toCommand());
  }
}
