import { Module, type INestApplication, type Provider, type Type } from '@nestjs/common';
import {
  ClientProxyFactory,
  Transport,
  type ClientProxy,
  type MicroserviceOptions,
} from '@nestjs/microservices';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test } from '@nestjs/testing';
import { IdempotencyModule, type IdempotencyModuleOptions } from '../../lib/index.js';
import { CapturedLog } from './captured-log.js';
import type { HttpPlatform } from './databases.js';
import { apolloModule } from './graphql.js';

/** An app for the route options' specs: the module on its in-memory store, HTTP, GraphQL, NATS. */
export interface OptionsApp {
  readonly app: INestApplication;
  readonly http: any;
  readonly log: CapturedLog;
  /** A NATS client, when the app listens on NATS too. */
  readonly nats: ClientProxy | undefined;
  close(): Promise<void>;
}

export interface OptionsAppSetup {
  readonly platform?: HttpPlatform;
  readonly controllers?: Type[];
  readonly providers?: Provider[];
  readonly module?: IdempotencyModuleOptions;
  /** Serve GraphQL (Apollo, code first) at /graphql. */
  readonly graphql?: boolean;
  /** Listen on NATS at this URL too. */
  readonly natsUrl?: string;
}

/** Boots the app; a startup that fails closes what it opened and rejects with its error. */
export async function bootOptionsApp(setup: OptionsAppSetup): Promise<OptionsApp> {
  const platform = setup.platform ?? 'express';
  const log = new CapturedLog();
  @Module({
    imports: [
      IdempotencyModule.forRoot({ purgeInterval: false, ...setup.module }),
      ...(setup.graphql ? [apolloModule(platform, { autoSchemaFile: true })] : []),
    ],
    controllers: setup.controllers ?? [],
    providers: setup.providers ?? [],
  })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const app =
    platform === 'fastify'
      ? moduleRef.createNestApplication(new FastifyAdapter(), { logger: log })
      : moduleRef.createNestApplication({ logger: log });
  let nats: ClientProxy | undefined;
  try {
    if (setup.natsUrl) {
      app.connectMicroservice<MicroserviceOptions>({
        transport: Transport.NATS,
        options: { servers: [setup.natsUrl] },
      });
      await app.startAllMicroservices();
    }
    await app.init();
    if (platform === 'fastify') await app.getHttpAdapter().getInstance().ready();
    if (setup.natsUrl) {
      nats = ClientProxyFactory.create({
        transport: Transport.NATS,
        options: { servers: [setup.natsUrl] },
      });
      await nats.connect();
    }
  } catch (error) {
    await app.close().catch(() => undefined);
    throw error;
  }
  return {
    app,
    http: app.getHttpServer(),
    log,
    nats,
    close: async () => {
      await nats?.close();
      await app.close();
    },
  };
}

/**
 * The app of one `describe` block: booted in its `beforeAll`, closed in its `afterAll` (if it
 * booted). Its members are read in the block's tests, once it is up.
 */
export function optionsAppForSuite(setup: OptionsAppSetup): Omit<OptionsApp, 'close'> {
  let booted: OptionsApp | undefined;
  beforeAll(async () => {
    booted = await bootOptionsApp(setup);
  });
  afterAll(() => booted?.close());
  const up = (): OptionsApp => {
    if (!booted) throw new Error('The options app is not up: read it in a test, after beforeAll');
    return booted;
  };
  return {
    get app() {
      return up().app;
    },
    get http() {
      return up().http;
    },
    get log() {
      return up().log;
    },
    get nats() {
      return up().nats;
    },
  };
}

/** The error a message was answered with; rejects if it was answered with a value instead. */
export function rpcFailure(answer: Promise<unknown>): Promise<Record<string, unknown>> {
  return answer.then(
    () => Promise.reject(new Error('the message was answered')),
    (error: unknown) => error as Record<string, unknown>,
  );
}

/** Handler runs counted by name. */
export class Runs {
  private readonly counts = new Map<string, number>();
  /** Counts one run of `name` and returns its number. */
  ran(name: string): number {
    const n = (this.counts.get(name) ?? 0) + 1;
    this.counts.set(name, n);
    return n;
  }
  of(name: string): number {
    return this.counts.get(name) ?? 0;
  }
}
