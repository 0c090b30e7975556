import {
  Global,
  Inject,
  Injectable,
  Logger,
  Module,
  type OnApplicationShutdown,
} from '@nestjs/common';
import { DataSource } from 'typeorm';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import { closeSampleDataSource, openSampleDataSource } from './data-source.factory.js';

/**
 * Closes the DataSource last: Nest runs shutdown hooks after the HTTP server has stopped and after
 * every module's destroy hook (the idempotency purge job's included), so nothing still needs it.
 */
@Injectable()
class DataSourceCloser implements OnApplicationShutdown {
  constructor(@Inject(DataSource) private readonly dataSource: DataSource) {}

  async onApplicationShutdown(): Promise<void> {
    await closeSampleDataSource(this.dataSource);
    new Logger('Database').log('Closed');
  }
}

/**
 * Provides the one `DataSource` (by its class as token) to the features and to
 * `IdempotencyModule.forRootAsync`. Global, so feature modules need not import it.
 */
@Global()
@Module({
  providers: [
    {
      provide: DataSource,
      inject: [SAMPLE_CONFIG],
      useFactory: (config: SampleConfig) => openSampleDataSource(config.database),
    },
    DataSourceCloser,
  ],
  exports: [DataSource],
})
export class DatabaseModule {}
