import { Inject, Module, type OnApplicationShutdown, type Provider } from '@nestjs/common';
import {
  ConfigurableIdempotencyModule,
  IDEMPOTENCY_MODULE_OPTIONS,
} from './idempotency.module-definition.js';
import { RESOLVED_OPTIONS, resolveModuleOptions, type ResolvedModuleOptions } from './idempotency.options.js';
import { IdempotencyPurgeJob } from './idempotency-purge.job.js';
import { IdempotencyService } from './idempotency.service.js';
import { IdempotencyMetrics } from './idempotency-metrics.js';
import { IdempotencyInterceptor } from './interceptors/idempotency.interceptor.js';
import { IdempotentRoutesCheck } from './interceptors/idempotent-routes.check.js';
import { DiscoveryModule } from '@nestjs/core';
import type { IdempotencyModuleOptions } from './interfaces/idempotency-options.interface.js';
import { IdempotencyStore } from './storage/idempotency-store.interface.js';
import {
  ensureIdempotencyTable,
  openIdempotencyConnection,
  type IdempotencyConnection,
} from './storage/typeorm/idempotency-data-source.js';
import { TypeOrmIdempotencyStore } from './storage/typeorm/typeorm-idempotency.store.js';

/** Internal token: the TypeORM connection, or null when a custom store is given. */
const IDEMPOTENCY_CONNECTION = Symbol('IdempotencyConnection');

const providers: Provider[] = [
  {
    provide: RESOLVED_OPTIONS,
    useFactory: (options: IdempotencyModuleOptions) => resolveModuleOptions(options),
    inject: [IDEMPOTENCY_MODULE_OPTIONS],
  },
  {
    provide: IDEMPOTENCY_CONNECTION,
    useFactory: async (options: IdempotencyModuleOptions, resolved: ResolvedModuleOptions) => {
      if (options.store) return null;
      const connection = await openIdempotencyConnection(options.dataSource);
      try {
        if (resolved.runMigrations) await ensureIdempotencyTable(connection.dataSource);
      } catch (error) {
        if (connection.owned) await connection.dataSource.destroy();
        throw error;
      }
      return connection;
    },
    inject: [IDEMPOTENCY_MODULE_OPTIONS, RESOLVED_OPTIONS],
  },
  {
    provide: IdempotencyStore,
    useFactory: (options: IdempotencyModuleOptions, connection: IdempotencyConnection | null) =>
      options.store ?? new TypeOrmIdempotencyStore(connection!.dataSource),
    inject: [IDEMPOTENCY_MODULE_OPTIONS, IDEMPOTENCY_CONNECTION],
  },
  IdempotencyService,
  IdempotencyMetrics,
  IdempotencyInterceptor,
  IdempotencyPurgeJob,
  IdempotentRoutesCheck,
];

/**
 * Idempotency-Key support. Import once, in the root module:
 * `IdempotencyModule.forRoot({ ttl: '24h' })`, then put `@Idempotent()` on the routes to protect.
 */
@Module({
  imports: [DiscoveryModule],
  providers,
  exports: [IdempotencyMetrics, IdempotencyService, IdempotencyInterceptor, IdempotencyPurgeJob, IdempotencyStore, RESOLVED_OPTIONS],
})
export class IdempotencyModule extends ConfigurableIdempotencyModule implements OnApplicationShutdown {
  constructor(
    @Inject(IDEMPOTENCY_CONNECTION) private readonly connection: IdempotencyConnection | null,
  ) {
    super();
  }

  /**
   * Closes the connection the module opened itself; an app's own DataSource is left open. Done at
   * application shutdown, after Nest has closed the HTTP server, so requests still running when
   * `app.close()` was called can store their results.
   */
  async onApplicationShutdown(): Promise<void> {
    if (this.connection?.owned && this.connection.dataSource.isInitialized) {
      await this.connection.dataSource.destroy();
    }
  }
}
