import {
  Inject,
  Module,
  type DynamicModule,
  type OnApplicationShutdown,
  type Provider,
} from '@nestjs/common';
import {
  ConfigurableIdempotencyModule,
  IDEMPOTENCY_MODULE_OPTIONS,
  OPTIONS_TYPE,
  ASYNC_OPTIONS_TYPE,
} from './idempotency.module-definition.js';
import {
  RESOLVED_OPTIONS,
  resolveModuleOptions,
  type ResolvedModuleOptions,
} from './idempotency.options.js';
import { IdempotencyPurgeJob } from './idempotency-purge.job.js';
import { IdempotencyService } from './idempotency.service.js';
import { IdempotencyAdmin } from './admin/idempotency-admin.service.js';
import { IdempotencyContext } from './idempotency.context.js';
import { IdempotencyMetrics } from './idempotency-metrics.js';
import { IdempotencyTracing } from './observability/idempotency-tracing.js';
import { observedKeyEvents } from './observability/key-event-observers.js';
import { KeyEvents } from './core/key-events.js';
import { IdempotencyInterceptor } from './interceptors/idempotency.interceptor.js';
import { IdempotentRoutesCheck } from './interceptors/idempotent-routes.check.js';
import { IdempotencyRunner } from './functions/idempotency-runner.js';
import { IdempotentMethodsExplorer } from './functions/idempotent-methods.explorer.js';
import { GraphQLTransport } from './transports/graphql.transport.js';
import { HttpTransport } from './transports/http.transport.js';
import { RpcTransport } from './transports/rpc.transport.js';
import { idempotencyOpenApiProvider } from './openapi/idempotency-openapi.js';
import { DiscoveryModule } from '@nestjs/core';
import type { IdempotencyModuleOptions } from './interfaces/idempotency-options.interface.js';
import { IdempotencyStore } from './storage/idempotency-store.interface.js';
import {
  ensureIdempotencyTable,
  missingTableWarning,
  openIdempotencyConnection,
  type IdempotencyConnection,
} from './storage/typeorm/idempotency-data-source.js';
import { TypeOrmIdempotencyStore } from './storage/typeorm/typeorm-idempotency.store.js';
import { quietLogger } from './utils/quiet-logger.js';

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
      refuseInMemoryInProduction(options);
      const connection = await openIdempotencyConnection(options.dataSource);
      try {
        if (resolved.runMigrations) await ensureIdempotencyTable(connection.dataSource);
        else {
          const warning = await missingTableWarning(connection.dataSource);
          if (warning) quietLogger('Idempotency').warn(warning);
        }
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
    useFactory: (
      options: IdempotencyModuleOptions,
      resolved: ResolvedModuleOptions,
      connection: IdempotencyConnection | null,
    ) =>
      options.store ??
      new TypeOrmIdempotencyStore(connection!.dataSource, {
        waitNotifications: resolved.waitNotifications,
        listenerUrl: options.listenerUrl,
        transactionRunner: options.transactionRunner,
      }),
    inject: [IDEMPOTENCY_MODULE_OPTIONS, RESOLVED_OPTIONS, IDEMPOTENCY_CONNECTION],
  },
  { provide: IdempotencyTracing, useFactory: () => IdempotencyTracing.load() },
  // The key's events, observed by the metrics, the logs and (when a tracer is active) the spans.
  {
    provide: KeyEvents,
    useFactory: observedKeyEvents,
    inject: [IdempotencyMetrics, IdempotencyTracing],
  },
  IdempotencyService,
  IdempotencyAdmin,
  IdempotencyContext,
  IdempotencyMetrics,
  IdempotencyInterceptor,
  HttpTransport,
  GraphQLTransport,
  RpcTransport,
  IdempotencyPurgeJob,
  IdempotentRoutesCheck,
  idempotencyOpenApiProvider,
  IdempotencyRunner,
  IdempotentMethodsExplorer,
];

/**
 * The default store (an in-memory PGlite database) forgets every key on restart and is not shared
 * between instances: under `NODE_ENV=production` it must be chosen explicitly.
 */
function refuseInMemoryInProduction(options: IdempotencyModuleOptions): void {
  if (options.dataSource || options.allowInMemoryStore || process.env.NODE_ENV !== 'production')
    return;
  throw new Error(
    'nestjs-idempotency: NODE_ENV is production but IdempotencyModule has no `dataSource` or `store`, so keys would live in an in-memory database: ' +
      'a restart would forget them and other instances would not see them, so retries after a deploy or on another instance would run handlers twice. ' +
      'Pass your TypeORM DataSource (`dataSource`, e.g. PostgreSQL), a `store`, or set `allowInMemoryStore: true` to accept this.',
  );
}

/**
 * Idempotency-Key support. Import once, in the root module:
 * `IdempotencyModule.forRoot({ ttl: '24h' })`, then put `@Idempotent()` on the routes to protect.
 */
@Module({
  imports: [DiscoveryModule],
  providers,
  exports: [
    IdempotencyAdmin,
    IdempotencyMetrics,
    IdempotencyContext,
    IdempotencyService,
    IdempotencyRunner,
    HttpTransport,
    GraphQLTransport,
    RpcTransport,
    IdempotencyInterceptor,
    IdempotencyPurgeJob,
    IdempotencyStore,
    RESOLVED_OPTIONS,
  ],
})
export class IdempotencyModule
  extends ConfigurableIdempotencyModule
  implements OnApplicationShutdown
{
  constructor(
    @Inject(IDEMPOTENCY_CONNECTION) private readonly connection: IdempotencyConnection | null,
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
  ) {
    super();
  }

  /** As generated by ConfigurableModuleBuilder, but `forRoot()` with no argument means defaults. */
  static forRoot(options: typeof OPTIONS_TYPE = {}): DynamicModule {
    return super.forRoot(options);
  }

  /**
   * The options made by a factory, a class or an existing provider, e.g. to reuse the app's
   * DataSource: `forRootAsync({ inject: [DataSource], useFactory: (dataSource) => ({ dataSource }) })`.
   */
  static forRootAsync(options: typeof ASYNC_OPTIONS_TYPE): DynamicModule {
    return super.forRootAsync(options);
  }

  /**
   * Closes the store the module built (its LISTEN connection, on PostgreSQL), then the connection
   * the module opened itself; an app's own DataSource is left open. Done at application shutdown,
   * after Nest has closed the HTTP server, so requests still running when `app.close()` was called
   * can store their results.
   */
  async onApplicationShutdown(): Promise<void> {
    if (this.store instanceof TypeOrmIdempotencyStore && this.connection) await this.store.close();
    if (this.connection?.owned && this.connection.dataSource.isInitialized) {
      await this.connection.dataSource.destroy();
    }
  }
}
