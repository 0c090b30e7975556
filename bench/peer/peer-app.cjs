'use strict';
/**
 * The peer under load: the bench's handler behind @node-idempotency/nestjs, in its own process.
 * That package declares NestJS 9/10 as peers (npm refuses it next to NestJS 12 with ERESOLVE), so it
 * runs here on NestJS 10 from bench/peer/node_modules. Plain CommonJS without a build step: the
 * project's tsc never sees it. Decorators are applied by hand for the same reason.
 *
 *   node --expose-gc bench/peer/peer-app.cjs redis|memory   (forked by the bench runner, IPC)
 */
require('reflect-metadata');
const { randomUUID } = require('node:crypto');
const { Body, Controller, Module, Post, UseInterceptors } = require('@nestjs/common');
const { NestFactory } = require('@nestjs/core');
const { Idempotent, NodeIdempotencyModule } = require('@node-idempotency/nestjs');
const { RedisStorageAdapter } = require('@node-idempotency/storage-adapter-redis');
const { MemoryStorageAdapter } = require('@node-idempotency/storage-adapter-memory');

const adapterName = process.argv[2];
if (adapterName !== 'redis' && adapterName !== 'memory') {
  throw new TypeError(`usage: peer-app.cjs redis|memory; got ${adapterName}`);
}
/** Every key the bench writes starts with this, so closing can delete exactly those. */
const KEY_PREFIX = 'nestjs-idempotency-bench';

/** Same as acceptOrder in bench/bench-app.ts. */
function acceptOrder(body) {
  return {
    id: randomUUID(),
    amount: body.amount,
    currency: body.currency,
    customer: body.customer,
    status: 'accepted',
  };
}

/** An interceptor that does nothing: NestJS 10's interceptor pipeline alone (see bench-app.ts). */
class PassThroughInterceptor {
  intercept(_context, next) {
    return next.handle();
  }
}

class OrdersController {
  plain(body) {
    return acceptOrder(body);
  }
  passThrough(body) {
    return acceptOrder(body);
  }
  create(body) {
    return acceptOrder(body);
  }
}
decorateMethod(OrdersController, 'plain', [Post('plain')]);
decorateMethod(OrdersController, 'passThrough', [
  Post('pass-through'),
  UseInterceptors(PassThroughInterceptor),
]);
decorateMethod(OrdersController, 'create', [Post(), Idempotent()]);
Reflect.decorate([Controller('orders')], OrdersController);

function decorateMethod(target, name, decorators) {
  const proto = target.prototype;
  const descriptor = Reflect.decorate(
    decorators,
    proto,
    name,
    Object.getOwnPropertyDescriptor(proto, name),
  );
  Object.defineProperty(proto, name, descriptor);
  Body()(proto, name, 0);
}

/** Storage round trips, counted by wrapping the adapter's three methods (the bench's "queries"). */
const calls = { total: 0, byStatement: {} };
function counted(adapter) {
  for (const method of ['setIfNotExists', 'set', 'get']) {
    const original = adapter[method].bind(adapter);
    adapter[method] = (...args) => {
      calls.total++;
      calls.byStatement[method] = (calls.byStatement[method] ?? 0) + 1;
      return original(...args);
    };
  }
  return adapter;
}

async function openAdapter() {
  if (adapterName === 'memory') return counted(new MemoryStorageAdapter());
  const adapter = new RedisStorageAdapter({
    url: process.env.BENCH_REDIS_URL || 'redis://127.0.0.1:6379',
  });
  await adapter.connect();
  return counted(adapter);
}

/** Deletes the bench's keys (the TTL of an hour would also drop them) before the client closes. */
async function deleteBenchKeys(adapter) {
  if (adapterName !== 'redis') return 0;
  let batch = [];
  let deleted = 0;
  for await (const key of adapter.client.scanIterator({ MATCH: `${KEY_PREFIX}:*`, COUNT: 1000 })) {
    batch.push(key);
    if (batch.length === 500) {
      deleted += await adapter.client.unlink(batch);
      batch = [];
    }
  }
  if (batch.length > 0) deleted += await adapter.client.unlink(batch);
  return deleted;
}

async function main() {
  const adapter = await openAdapter();
  class PeerModule {}
  Reflect.decorate(
    [
      Module({
        imports: [
          NodeIdempotencyModule.forRootAsync({
            storage: { adapter },
            cacheKeyPrefix: KEY_PREFIX,
            cacheTTLMS: 60 * 60 * 1000,
          }),
        ],
        controllers: [OrdersController],
      }),
    ],
    PeerModule,
  );
  const app = await NestFactory.create(PeerModule, {
    logger: ['error', 'warn'],
    abortOnError: false,
  });
  await app.listen(0, '127.0.0.1');
  const port = app.getHttpServer().address().port;

  const commands = {
    'queries-reset': () => {
      calls.total = 0;
      calls.byStatement = {};
    },
    'queries-read': () => ({
      typeorm: calls.total,
      wire: calls.total,
      byStatement: { ...calls.byStatement },
    }),
    memory: () => {
      if (global.gc) global.gc();
      const { rss, heapUsed, external } = process.memoryUsage();
      return { rss, heapUsed, external, gcForced: Boolean(global.gc) };
    },
    close: async () => {
      const deleted = await deleteBenchKeys(adapter);
      await app.close();
      setImmediate(() => process.exit(0));
      return { deleted };
    },
  };
  process.on('message', (command) => {
    const run = commands[command.cmd];
    Promise.resolve()
      .then(() => {
        if (!run) throw new Error(`unknown command ${command.cmd}`);
        return run();
      })
      .then(
        (result) => process.send({ id: command.id, ok: true, result: result ?? null }),
        (error) => process.send({ id: command.id, ok: false, error: error.message }),
      );
  });
  process.on('disconnect', () => app.close().finally(() => process.exit(0)));
  process.send({ type: 'ready', port, nest: require('@nestjs/core/package.json').version });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
