import 'reflect-metadata';
import type { INestApplication, LogLevel } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import type { Server } from 'node:http';
import { AppModule } from './app.module.js';
import { serveApiDocs } from './docs/api-docs.js';
import { resolveSampleConfig, type SampleAppOptions } from './config/sample.config.js';
import { closeSampleDataSource, currentPGliteDataSource } from './database/data-source.factory.js';

export interface CreateSampleAppOptions extends SampleAppOptions {
  /** Nest's log levels, or `false` for none; by default Nest's own default. */
  logger?: LogLevel[] | false;
}

/**
 * Builds the sample shop without listening, for `main.ts`, the demo and tests (`app.init()` or
 * `app.listen()` next; `app.close()` also closes the database).
 */
export async function createSampleApp(
  options: CreateSampleAppOptions = {},
): Promise<INestApplication<Server>> {
  const { logger, ...sampleOptions } = options;
  const config = resolveSampleConfig(sampleOptions);
  const pgliteBefore = currentPGliteDataSource();
  try {
    const app = await NestFactory.create<INestApplication<Server>>(AppModule.register(config), {
      // Throw instead of exiting the process, so a caller (a test) sees the error.
      abortOnError: false,
      // The raw bytes of JSON bodies as well (`request.rawBody`): webhook signatures are over them.
      rawBody: true,
      ...(logger === undefined ? {} : { logger }),
    });
    serveApiDocs(app);
    return app;
  } catch (error) {
    // A failed start leaves no lifecycle to close what it opened; release the PGlite database here
    // so the process (a test runner, say) can open another.
    const stranded = currentPGliteDataSource();
    if (stranded && stranded !== pgliteBefore) await closeSampleDataSource(stranded);
    throw error;
  }
}
