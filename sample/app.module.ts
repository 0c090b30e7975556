import { type DynamicModule, Module } from '@nestjs/common';
import { APP_PIPE } from '@nestjs/core';
import { ApolloDriver, type ApolloDriverConfig } from '@nestjs/apollo';
import { GraphQLModule } from '@nestjs/graphql';
import { DataSource } from 'typeorm';
import { IdempotencyModule } from '../lib/index.js';
import { apiKeyScope } from './common/api-key.scope.js';
import { sampleValidationPipe } from './common/validation.js';
import type { SampleConfig } from './config/sample.config.js';
import { SampleConfigModule } from './config/sample-config.module.js';
import { DatabaseModule } from './database/database.module.js';
import { MetricsModule } from './metrics/metrics.module.js';
import { OrdersModule } from './orders/orders.module.js';
import { PaymentsModule } from './payments/payments.module.js';
import { PAYMENTS_GRAPHQL_SCHEMA } from './payments/payments.resolver.js';
import { TransferQueueModule } from './transfers/transfer-queue.module.js';
import { TransfersModule } from './transfers/transfers.module.js';
import { WebhooksModule } from './webhooks/webhooks.module.js';

@Module({})
export class AppModule {
  static register(config: SampleConfig): DynamicModule {
    return {
      module: AppModule,
      imports: [
        SampleConfigModule.forRoot(config),
        DatabaseModule,
        // The library gets the app's own DataSource: its records sit next to the payments, in the
        // same database, and the module leaves closing that DataSource to the app.
        IdempotencyModule.forRootAsync({
          imports: [DatabaseModule],
          inject: [DataSource],
          useFactory: (dataSource: DataSource) => ({
            dataSource,
            ttl: '24h',
            lockTimeout: config.lockTimeout,
            scope: apiKeyScope,
          }),
        }),
        // GraphQL at /graphql; the request goes into the context, where the module reads the
        // Idempotency-Key header (when a mutation has no idempotencyKey argument) and the scope.
        GraphQLModule.forRoot<ApolloDriverConfig>({
          driver: ApolloDriver,
          typeDefs: PAYMENTS_GRAPHQL_SCHEMA,
          context: ({ req }: { req: unknown }) => ({ req }),
          // Apollo adds each error's stack trace unless NODE_ENV is production or test; under
          // `npm start` a client would see the server's files and lines in every refusal.
          includeStacktraceInErrorResponses: false,
        }),
        PaymentsModule,
        OrdersModule,
        TransfersModule,
        WebhooksModule,
        MetricsModule,
        ...(config.rabbitmqUrl ? [TransferQueueModule.register(config.rabbitmqUrl)] : []),
      ],
      // Every DTO is checked before its handler runs (see common/validation.ts).
      providers: [{ provide: APP_PIPE, useFactory: sampleValidationPipe }],
    };
  }
}
