import { resolve } from 'node:path';

/** What `createSampleApp()` accepts; anything left out falls back to the environment. */
export interface SampleAppOptions {
  /** PostgreSQL URL. Wins over `dataDir`; `DATABASE_URL` is used when neither is given. */
  databaseUrl?: string;
  /**
   * PGlite data folder, or `'memory://'` for a database that lives as long as the process. Falls
   * back to `SAMPLE_DATA_DIR`, then `.data/sample`.
   */
  dataDir?: string;
  /** Simulated payment gateway latency. Falls back to `GATEWAY_LATENCY_MS`, then 200. */
  gatewayLatencyMs?: number;
  /** The idempotency lockTimeout. Falls back to `IDEMPOTENCY_LOCK_TIMEOUT`, then `'1m'`. */
  lockTimeout?: string;
  /** RabbitMQ for the queued transfers and their consumer. Falls back to `RABBITMQ_URL`; none: off. */
  rabbitmqUrl?: string;
  /**
   * The secret the gateway signs its webhooks with and the shop verifies them with. Falls back to
   * `GATEWAY_WEBHOOK_SECRET`, then a fixed sample secret.
   */
  webhookSecret?: string;
  /**
   * How long the shop's webhook handler works on an event (a receipt email, say), so copies of it
   * arrive while it runs. Falls back to `WEBHOOK_HANDLER_LATENCY_MS`, then 100.
   */
  webhookHandlerLatencyMs?: number;
}

/** Where the sample's rows (and the idempotency records) live. */
export type DatabaseConfig =
  | { readonly kind: 'postgres'; readonly url: string }
  | { readonly kind: 'pglite'; readonly dataDir: string };

/** The options once resolved: what the providers receive under `SAMPLE_CONFIG`. */
export interface SampleConfig {
  readonly database: DatabaseConfig;
  readonly gatewayLatencyMs: number;
  readonly lockTimeout: string;
  /**
   * For the demo's crash scenario only (`SAMPLE_CRASH_AFTER_TRANSFER=1`): the process kills itself
   * (SIGKILL) right after a transfer's money moved, before its response is stored or sent.
   */
  readonly crashAfterTransfer: boolean;
  /** Set: `POST /transfers/async` and the consumer that executes the queued transfers. */
  readonly rabbitmqUrl: string | undefined;
  /** Shared by the gateway (it signs its webhooks) and the shop (it verifies them). */
  readonly webhookSecret: string;
  /** How long the shop's webhook handler works on each event. */
  readonly webhookHandlerLatencyMs: number;
}

export const SAMPLE_CONFIG = Symbol('SampleConfig');

/** Relative to the working directory, which is the project root under `npm start`. */
const DEFAULT_DATA_DIR = '.data/sample';
const DEFAULT_GATEWAY_LATENCY_MS = 200;
const DEFAULT_WEBHOOK_HANDLER_LATENCY_MS = 100;
/** A sample's secret, in Stripe's `whsec_` form; a real one comes from the sender's dashboard. */
const DEFAULT_WEBHOOK_SECRET = 'whsec_sample_shop_gateway_secret';

/**
 * Explicit options beat the environment, so a test or the demo that passes `dataDir` gets PGlite
 * even in a shell where `DATABASE_URL` is exported.
 */
export function resolveSampleConfig(
  options: SampleAppOptions = {},
  env: NodeJS.ProcessEnv = process.env,
): SampleConfig {
  return {
    database: resolveDatabase(options, env),
    gatewayLatencyMs: resolveLatency(
      'Gateway latency',
      options.gatewayLatencyMs ?? env.GATEWAY_LATENCY_MS,
      DEFAULT_GATEWAY_LATENCY_MS,
    ),
    lockTimeout: options.lockTimeout ?? (env.IDEMPOTENCY_LOCK_TIMEOUT || '1m'),
    crashAfterTransfer: env.SAMPLE_CRASH_AFTER_TRANSFER === '1',
    rabbitmqUrl: options.rabbitmqUrl ?? (env.RABBITMQ_URL || undefined),
    webhookSecret: options.webhookSecret ?? (env.GATEWAY_WEBHOOK_SECRET || DEFAULT_WEBHOOK_SECRET),
    webhookHandlerLatencyMs: resolveLatency(
      'Webhook handler latency',
      options.webhookHandlerLatencyMs ?? env.WEBHOOK_HANDLER_LATENCY_MS,
      DEFAULT_WEBHOOK_HANDLER_LATENCY_MS,
    ),
  };
}

function resolveDatabase(options: SampleAppOptions, env: NodeJS.ProcessEnv): DatabaseConfig {
  if (options.databaseUrl) return { kind: 'postgres', url: options.databaseUrl };
  if (options.dataDir) return { kind: 'pglite', dataDir: toDataDir(options.dataDir) };
  if (env.DATABASE_URL) return { kind: 'postgres', url: env.DATABASE_URL };
  return { kind: 'pglite', dataDir: toDataDir(env.SAMPLE_DATA_DIR || DEFAULT_DATA_DIR) };
}

function toDataDir(dataDir: string): string {
  return dataDir.startsWith('memory://') ? dataDir : resolve(dataDir);
}

function resolveLatency(
  name: string,
  value: number | string | undefined,
  fallback: number,
): number {
  if (value === undefined || value === '') return fallback;
  const latency = Number(value);
  // Fail at startup: a typo silently meaning "no latency" would make the demo meaningless.
  if (!Number.isFinite(latency) || latency < 0) {
    throw new TypeError(
      `${name} must be a non-negative number of ms; got ${JSON.stringify(value)}`,
    );
  }
  return latency;
}

/** For log lines: the URL without its password. */
export function describeDatabase(database: DatabaseConfig): string {
  if (database.kind === 'pglite') return `PGlite (${database.dataDir})`;
  try {
    const url = new URL(database.url);
    if (url.password) url.password = '***';
    return `PostgreSQL (${url.toString()})`;
  } catch {
    return 'PostgreSQL';
  }
}
