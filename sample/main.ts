import { Logger } from '@nestjs/common';
import { Transport } from '@nestjs/microservices';
import type { AddressInfo } from 'node:net';
import { createSampleApp } from './app.factory.js';
import { describeDatabase, SAMPLE_CONFIG, type SampleConfig } from './config/sample.config.js';
import { GatewayWebhookSender } from './gateway/gateway-webhook.sender.js';
import { TRANSFER_QUEUE } from './transfers/transfer-queue.module.js';

const port = Number(process.env.PORT ?? 3000);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new TypeError(`PORT must be a port number; got ${JSON.stringify(process.env.PORT)}`);
}

const app = await createSampleApp();
// SIGINT/SIGTERM close the app, which closes the database: PGlite flushes its folder on close.
app.enableShutdownHooks();
try {
  await app.listen(port);
} catch (error) {
  // Port taken, say: close the database (and its folder lock) before exiting.
  await app.close();
  throw error;
}

const config = app.get<SampleConfig>(SAMPLE_CONFIG);
if (config.rabbitmqUrl) {
  // A hybrid app: the same process consumes the queued transfers (manual acks: the module settles).
  app.connectMicroservice({
    transport: Transport.RMQ,
    options: {
      urls: [config.rabbitmqUrl],
      queue: TRANSFER_QUEUE,
      noAck: false,
      queueOptions: { durable: true },
    },
  });
  await app.startAllMicroservices();
}
// The port actually bound (PORT=0 picks a free one).
const { port: boundPort } = app.getHttpServer().address() as AddressInfo;
const base = `localhost:${boundPort}`;
// The simulated gateway delivers its webhooks to this very shop.
app.get(GatewayWebhookSender).start(`http://127.0.0.1:${boundPort}/webhooks/gateway`);
new Logger('Sample').log(
  `Listening on http://${base} — database: ${describeDatabase(config.database)}, gateway latency ${config.gatewayLatencyMs} ms`,
);
console.log(`
Try it: create a payment, then send the very same request again (same key):

  KEY=$(uuidgen 2>/dev/null || cat /proc/sys/kernel/random/uuid)
  curl -i -X POST ${base}/payments -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY" -d '{"amount":1000,"currency":"eur","source":"tok_visa"}'

The second answer is the first one replayed (header Idempotent-Replayed: true), and
  curl ${base}/payments
still lists a single payment. The same key with another body gets 422.
GraphQL at http://${base}/graphql, the same payments (idempotencyKey argument, or the header):

  curl -s ${base}/graphql -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY-gql" \\
    -d '{"query":"mutation { createPayment(amount: 500, currency: \\"eur\\", source: \\"tok_visa\\") { id amount } }"}'

Swagger UI at http://${base}/docs: every route, the Idempotency-Key header and its 400/409/422
answers; "Try it out" on POST /payments twice with the same key shows the replay.

Webhooks: each charge makes the gateway send a signed charge.succeeded event to POST /webhooks/gateway,
at least once: two copies at once, a late one, retries on any non-2xx. The shop acts on it once:
  curl ${base}/webhooks/gateway/events   each event id once, handler_runs 1
  curl ${base}/gateway/webhooks          every copy the gateway sent: all 2xx, the first answer replayed

More: POST /orders, POST /transfers, GET /accounts/acc_alice, GET /gateway/charges; npm run demo for a flaky client and a crash.
${config.rabbitmqUrl ? 'RabbitMQ consumer on: POST /transfers/async queues a transfer, executed once however often it is delivered.' : 'Set RABBITMQ_URL for POST /transfers/async and its RabbitMQ consumer.'}
`);
