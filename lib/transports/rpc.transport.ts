import { HttpException, Inject, Injectable, type ExecutionContext } from '@nestjs/common';
import { of, type Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { Outcome } from '../idempotency.service.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { readIdempotencyKey, type KeyReading } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import { boundedColumnValue } from './http-exchange.js';
import type { IdempotencyTransport, OperationDescription } from './idempotency-transport.js';
import { resultStorer } from './stored-result.js';

type Microservices = typeof import('@nestjs/microservices');

/** `@nestjs/microservices` is an optional peer: loaded on the first message, never for HTTP-only apps. */
let microservices: Microservices | undefined;
export async function loadMicroservices(): Promise<void> {
  microservices ??= await import('@nestjs/microservices');
}

/** What a message handler's `scope` resolver receives. */
export interface MessageScopeSource {
  /** The message's payload. */
  readonly data: unknown;
  /** The transport's context: RmqContext, NatsContext, MqttContext, RedisContext, TcpContext, KafkaContext. */
  readonly context: unknown;
}

/**
 * How a message ended, as told to `acknowledge`: `done` (its result is stored and committed, or it
 * was a duplicate of a completed message), `retry` (not done, and it may succeed later: in progress
 * elsewhere, the store unreachable, the handler failed and its key was released, its claim lost),
 * or `drop` (it can never succeed: another payload under its key, an invalid or missing key).
 */
export type SettledMessage =
  | { readonly kind: 'done'; readonly replayed: boolean }
  | { readonly kind: 'retry'; readonly reason: string }
  | { readonly kind: 'drop'; readonly reason: string };

/**
 * Settles a message with its broker, once `@Idempotent()` knows how it ended (see
 * `SettledMessage`): with manual acknowledgement, let the module acknowledge instead of the
 * handler, since the handler's own `ack` would come before the result is committed (a crash in
 * between would lose the message) and never comes for a duplicate the module answers itself.
 */
export type MessageAcknowledgement = (context: unknown, settled: SettledMessage) => void;

/**
 * For RabbitMQ with `noAck: false`: `ack` what is done, `nack` with requeue what should be retried
 * (the broker delivers it again), `nack` without requeue what can never succeed (to the queue's
 * dead-letter exchange, if it has one).
 */
export const rabbitMqAcknowledgement: MessageAcknowledgement = (context, settled) => {
  const rmq = context as { getChannelRef(): AmqpChannel; getMessage(): unknown };
  const channel = rmq.getChannelRef();
  if (settled.kind === 'done') channel.ack(rmq.getMessage());
  else channel.nack(rmq.getMessage(), false, settled.kind === 'retry');
};

interface AmqpChannel {
  ack(message: unknown): void;
  nack(message: unknown, allUpTo?: boolean, requeue?: boolean): void;
}

/** A stored RpcException: replayed as the same RpcException. */
interface StoredRpcError {
  readonly rpcError: unknown;
}

/**
 * Microservice handlers (`@MessagePattern`, `@EventPattern`) on every transport. The key is the
 * payload's `messageKeyField` (default `idempotencyKey`), else the transport's own message
 * identity: RabbitMQ `message_id` (or an `idempotency-key` header), NATS `Nats-Msg-Id` (or
 * `Idempotency-Key`) headers, MQTT 5 user property `idempotency-key`, Kafka `idempotency-key`
 * header or else topic/partition/offset. Each handler is its own endpoint (`RPC Class.method`), so
 * two event handlers of one event each process a message once. A duplicate of a completed
 * `@MessagePattern` gets the stored reply; a duplicate event is dropped. Duplicates in flight wait
 * by default (bounded by `waitTimeout`); with `concurrency: 'reject'` they fail with a
 * `request-in-progress` RpcException so the broker can deliver them again later.
 */
@Injectable()
export class RpcTransport implements IdempotencyTransport {
  readonly type = 'rpc';
  readonly defaultConcurrency = 'wait';

  constructor(@Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions) {}

  applies(): boolean {
    return true;
  }

  readKey(context: ExecutionContext): KeyReading {
    const rpc = context.switchToRpc();
    const field = (rpc.getData() as Record<string, unknown> | null | undefined)?.[
      this.moduleOptions.messageKeyField
    ];
    if (field !== undefined && field !== null) {
      if (typeof field !== 'string')
        return {
          kind: 'invalid',
          reason: `The payload's ${this.moduleOptions.messageKeyField} must be a string.`,
        };
      return readIdempotencyKey([field]);
    }
    const fromTransport = transportKey(rpc.getContext());
    return fromTransport === undefined ? { kind: 'absent' } : readIdempotencyKey([fromTransport]);
  }

  describe(context: ExecutionContext): OperationDescription {
    const rpc = context.switchToRpc();
    const endpoint = boundedColumnValue(
      `RPC ${context.getClass().name}.${context.getHandler().name}`,
    );
    return {
      endpoint,
      scopeSource: { data: rpc.getData(), context: rpc.getContext() } satisfies MessageScopeSource,
      fingerprint: { method: 'RPC', url: endpoint, body: rpc.getData() ?? null },
    };
  }

  capture(
    _context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null {
    const store = resultStorer(
      { key: id.key, endpoint: id.endpoint, headers: {} },
      options.shouldStore,
      this.moduleOptions.maxResponseBytes,
    );
    if (outcome.ok) return store(200, outcome.value, false);
    const { error } = outcome;
    // An RpcException is the handler's deliberate answer (stored as a 400 unless it carries a
    // `statusCode` of its own); an HttpException as on HTTP; anything else is a crash: released.
    if (microservices && error instanceof microservices.RpcException) {
      const body = error.getError();
      const statusCode = (body as { statusCode?: unknown } | null)?.statusCode;
      const status =
        typeof statusCode === 'number' && statusCode >= 400 && statusCode < 600 ? statusCode : 400;
      return store(status, { rpcError: body } satisfies StoredRpcError, true);
    }
    if (error instanceof HttpException) return store(error.getStatus(), error.getResponse(), true);
    return null;
  }

  replay(_context: ExecutionContext, stored: StoredResponse): Observable<unknown> {
    const body = decodeBody(stored);
    if (!stored.isError) return of(body);
    const rpcError = (body as Partial<StoredRpcError> | null)?.rpcError;
    if (rpcError !== undefined) throw new microservices!.RpcException(rpcError as object);
    throw new HttpException(body as string | object, stored.status);
  }

  /** An RpcException whose error object the client receives: `code`, `statusCode`, `message`, … */
  reject(_context: ExecutionContext, rejection: IdempotencyRejection): Error {
    return new microservices!.RpcException({
      status: 'error',
      code: rejection.code,
      statusCode: rejection.status,
      message: rejection.detail,
      ...(rejection.retryAfterSeconds === undefined
        ? {}
        : { retryAfterSeconds: rejection.retryAfterSeconds }),
    });
  }

  settled(context: ExecutionContext, settled: SettledMessage, options: ResolvedRouteOptions): void {
    options.acknowledge?.(context.switchToRpc().getContext(), settled);
  }
}

/** The message's own identity, where its transport has one (see RpcTransport). */
export function transportKey(context: unknown): string | undefined {
  // Each broker's context and message have their own shape, read member by member below.
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  type Member = ((...args: unknown[]) => any) | undefined;
  const rpc = context as Record<string, Member> | null | undefined;
  if (!rpc) return undefined;
  const message = rpc.getMessage?.();
  if (typeof rpc.getPartition === 'function') {
    // Kafka: a header, else the message's place in the log (stable across redeliveries).
    return (
      text(message?.headers?.['idempotency-key']) ??
      `${rpc.getTopic?.()}/${rpc.getPartition()}/${message?.offset}`
    );
  }
  if (message?.properties) {
    // RabbitMQ: the message_id property, or a header.
    return (
      text(message.properties.messageId) ?? text(message.properties.headers?.['idempotency-key'])
    );
  }
  if (typeof rpc.getHeaders === 'function') {
    // NATS: JetStream's de-duplication id, or a header of that name.
    const headers = rpc.getHeaders();
    return text(headers?.get?.('Nats-Msg-Id')) ?? text(headers?.get?.('Idempotency-Key'));
  }
  if (typeof rpc.getPacket === 'function') {
    // MQTT 5: a user property.
    return text(rpc.getPacket()?.properties?.userProperties?.['idempotency-key']);
  }
  return undefined;
}

function text(value: unknown): string | undefined {
  const first = Array.isArray(value) ? value[0] : value;
  if (Buffer.isBuffer(first)) return first.toString('utf8') || undefined;
  return typeof first === 'string' && first !== '' ? first : undefined;
}
