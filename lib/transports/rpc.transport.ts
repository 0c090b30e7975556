import { HttpException, Inject, Injectable, type ExecutionContext } from '@nestjs/common';
import { ApplicationConfig } from '@nestjs/core';
import { from, lastValueFrom, of, toArray, type Observable } from 'rxjs';
import type { IdempotencyRejection } from '../errors/idempotency-rejection.js';
import {
  RESOLVED_OPTIONS,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { MessageAcknowledgement, Outcome, SettledMessage } from '../core/types.js';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';
import { canonicalJson } from '../utils/fingerprint.js';
import { readIdempotencyKey, type KeyReading } from '../utils/idempotency-key.js';
import { decodeBody } from '../utils/response-body.js';
import { boundedColumnValue } from './http-exchange.js';
import type { KeySource, MessageScopeSource } from '../interfaces/idempotency-options.interface.js';
import {
  functionKeyReader,
  pathKeyReader,
  sourceParts,
  type IdempotencyTransport,
  type KeyReader,
  type OperationDescription,
} from './idempotency-transport.js';
import { storedResult } from './stored-result.js';
import { ReplayedExceptions } from './replayed-exception.js';
import { quietLogger } from '../utils/quiet-logger.js';

type Microservices = typeof import('@nestjs/microservices');

/** `@nestjs/microservices` is an optional peer: loaded on the first message, never for HTTP-only apps. */
let microservices: Microservices | undefined;
export async function loadMicroservices(): Promise<void> {
  microservices ??= await import('@nestjs/microservices');
}

export type { MessageScopeSource };

export type { MessageAcknowledgement, SettledMessage };

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

/** A stored domain error (`storeIf`): replayed as an error of its class (see `ReplayedExceptions`). */
interface StoredDomainError {
  readonly domainError: string;
}

/** A handler's answer of several values (an Observable): Nest sends each to the caller. */
class MessageReplies {
  constructor(readonly values: readonly unknown[]) {}
}

/** The stored headers of an answer of several values, stored as their array. */
const SEVERAL_REPLIES: StoredResponse['headers'] = { 'rpc-replies': 'several' };

/** The metadata keys of `@nestjs/microservices`' pattern decorators. */
const PATTERN_METADATA = 'microservices:pattern';
const TRANSPORT_METADATA = 'microservices:transport';

/** A thrown error as the handler's answer: its status (none: an RpcException's own), what is stored. */
interface ErrorAnswer {
  readonly status: number | undefined;
  readonly value: unknown;
}

const storeAlways = () => true;

/**
 * Whether a released status may pass when the same message is delivered again: a 5xx, 408 or 429.
 * Any other (400, 401, 403, 422 by default, and a 404 or 409 a route's policy releases) is the
 * handler refusing the message, which it would refuse again however often it came.
 */
const mayPassLater = (status: number) => status >= 500 || status === 408 || status === 429;

/** The metadata key of the handler type `@EventPattern` records (`PatternHandler.EVENT`, 2). */
const PATTERN_HANDLER_METADATA = 'microservices:handler_type';
const EVENT_HANDLER = 2;

/** Whether the handler is an `@EventPattern`'s: what it returns is sent to no one. */
function isEventHandler(handler: Function): boolean {
  return Reflect.getMetadata(PATTERN_HANDLER_METADATA, handler) === EVENT_HANDLER;
}

/**
 * How a message that several handlers settled ends: retried if one of them may pass later (the
 * others, done, replay it as a duplicate), else dropped if one refused it, else done.
 */
function together(settlements: readonly SettledMessage[]): SettledMessage {
  return (
    settlements.find((settled) => settled.kind === 'retry') ??
    settlements.find((settled) => settled.kind === 'drop') ?? {
      kind: 'done',
      replayed: settlements.every((settled) => settled.kind === 'done' && settled.replayed),
    }
  );
}

/**
 * Microservice handlers (`@MessagePattern`, `@EventPattern`) on every transport. The key is the
 * payload's `messageKeyField` (default `idempotencyKey`), else the transport's own message
 * identity: RabbitMQ `idempotency-key` header (in any case) or else `message_id`, NATS
 * `Nats-Msg-Id` (or `Idempotency-Key`) headers, MQTT 5 user property `idempotency-key`, Kafka
 * `idempotency-key` header or else topic/partition/offset. A payload field may be a string or an
 * integer. Each handler is its own endpoint
 * (`RPC Class.method pattern`, with ` (TRANSPORT)` when the handler names its transport), so two
 * event handlers of one event each process a message once. A duplicate of a completed
 * `@MessagePattern` gets the stored reply (every value, when the handler answered several); a
 * duplicate event is dropped. Duplicates in flight wait by default (bounded by `waitTimeout`); with
 * `concurrency: 'reject'` they fail with a `request-in-progress` RpcException so the broker can
 * deliver them again later.
 */
@Injectable()
export class RpcTransport implements IdempotencyTransport {
  readonly type = 'rpc';
  readonly defaultConcurrency = 'wait';
  private readonly logger = quietLogger('Idempotency');
  /** Each handler's endpoint, with the class it was computed for (a method may be inherited). */
  private readonly endpoints = new WeakMap<Function, { controller: Function; endpoint: string }>();
  /** The handler of each endpoint: a second handler on one endpoint shares its keys (warned). */
  private readonly handlers = new Map<string, { controller: Function; handler: Function }>();
  /** Event handlers that share their event with other acknowledging ones: how many settle it. */
  private readonly sharedEvents = new Map<Function, number>();
  /** A message's settlements so far, while other handlers of its event have yet to settle it. */
  private readonly pendingSettlements = new WeakMap<object, SettledMessage[]>();

  private readonly exceptions: ReplayedExceptions;

  constructor(
    @Inject(RESOLVED_OPTIONS) private readonly moduleOptions: ResolvedModuleOptions,
    config: ApplicationConfig,
  ) {
    this.exceptions = new ReplayedExceptions(() => [
      ...config.getGlobalFilters(),
      ...config.getGlobalRequestFilters().map((wrapper) => wrapper.metatype),
    ]);
  }

  applies(): boolean {
    return true;
  }

  /**
   * The payload's `messageKeyField`, else the transport's message identity; or `keyFrom`'s header
   * (AMQP headers, NATS headers, MQTT 5 user properties, Kafka headers; Redis and TCP have none),
   * payload path or function.
   */
  keyReader(source: KeySource | undefined): KeyReader {
    if (source === undefined) return (context) => this.readKey(context);
    if (typeof source === 'function') return functionKeyReader(source);
    const [kind, text] = sourceParts(source);
    if (kind === 'header') {
      const name = text.toLowerCase();
      return (context) => {
        const values = transportHeader(context.switchToRpc().getContext(), name);
        // Sent twice (a NATS header appended twice, a Kafka header repeated): refused, as on HTTP.
        return values.length === 0 ? { kind: 'absent' } : readIdempotencyKey(values, text);
      };
    }
    if (kind === 'payload')
      return pathKeyReader(text, "the payload's", (context) => context.switchToRpc().getData());
    return () => ({ kind: 'absent' });
  }

  private readKey(context: ExecutionContext): KeyReading {
    const rpc = context.switchToRpc();
    const data = rpc.getData<unknown>();
    const field =
      typeof data === 'object' && data !== null
        ? (data as Record<string, unknown>)[this.moduleOptions.messageKeyField]
        : undefined;
    if (field !== undefined && field !== null) {
      // An integer is a key too (an id from a sequence): 42 and '42' are one key.
      if (typeof field === 'number' && Number.isSafeInteger(field))
        return readIdempotencyKey([String(field)]);
      if (typeof field !== 'string')
        return {
          kind: 'invalid',
          reason: `The payload's ${this.moduleOptions.messageKeyField} must be a string or an integer.`,
        };
      return readIdempotencyKey([field]);
    }
    const fromTransport = transportKey(rpc.getContext());
    return fromTransport === undefined ? { kind: 'absent' } : readIdempotencyKey([fromTransport]);
  }

  describe(context: ExecutionContext, fingerprinted: boolean): OperationDescription {
    const rpc = context.switchToRpc();
    const endpoint = this.endpointOf(context);
    const data: unknown = rpc.getData();
    return {
      endpoint,
      scopeSource: { data, context: rpc.getContext() } satisfies MessageScopeSource,
      payload: data,
      fingerprint: fingerprinted ? { method: 'RPC', url: endpoint, body: data ?? null } : undefined,
    };
  }

  capture(
    context: ExecutionContext,
    outcome: Outcome,
    options: ResolvedRouteOptions,
    id: RecordId,
  ): StoredResponse | null {
    const call = { key: id.key, endpoint: id.endpoint, headers: {} };
    const { maxResponseBytes } = this.moduleOptions;
    if (outcome.ok) {
      // An event has no reply: what its handler returns is sent to no one, so it is not kept (nor
      // can its size or form release the key of a message that was handled).
      const value = isEventHandler(context.getHandler()) ? undefined : outcome.value;
      return value instanceof MessageReplies
        ? storedResult(
            { ...call, headers: SEVERAL_REPLIES, status: 200, value: value.values, isError: false },
            options.shouldStore,
            maxResponseBytes,
          )
        : storedResult(
            { ...call, status: 200, value, isError: false },
            options.shouldStore,
            maxResponseBytes,
          );
    }
    const { error } = outcome;
    const answer = this.answerOf(error) ?? this.storedCrash(error, options, context);
    if (!answer) return null;
    // An RpcException without a status is the handler's final answer, whatever `storeStatuses`
    // says of statuses (it is recorded as a 400); one with a `statusCode` is stored by the policy.
    return storedResult(
      { ...call, status: answer.status ?? 400, value: answer.value, isError: true },
      answer.status === undefined ? storeAlways : (status) => options.shouldStore(status, error),
      maxResponseBytes,
    );
  }

  /**
   * An error that is no answer, which `storeIf` keeps (a domain error), as a 500: thrown again by
   * a replay, of its class when the app's or the handler's filters catch it.
   */
  private storedCrash(
    error: unknown,
    options: ResolvedRouteOptions,
    context?: ExecutionContext,
  ): ErrorAnswer | undefined {
    if (!options.storesAnyError || !(error instanceof Error) || !options.shouldStore(500, error))
      return undefined;
    if (!context) return { status: 500, value: undefined };
    const route = { handler: context.getHandler(), controller: context.getClass() };
    const domainError = this.exceptions.domainEntryFor(error, route);
    return { status: 500, value: { domainError } satisfies StoredDomainError };
  }

  /**
   * How a message whose handler (or `scope` resolver) threw ends, unless its outcome was stored
   * (then it is `done`): an answer — an RpcException without a `statusCode`, a status the policy
   * stores — is `done`; a crash, a 5xx, 408 or 429 may succeed later: `retry`; any other status the
   * policy releases (400, 401, 403, 422 by default; a 404 a policy of its own releases) is a
   * refusal that fails again however often it is delivered: `drop` (with RabbitMQ, to the
   * dead-letter exchange), so it cannot loop.
   */
  settledAfterError(error: unknown, options: ResolvedRouteOptions): SettledMessage {
    const answer = this.answerOf(error);
    if (!answer)
      return this.storedCrash(error, options)
        ? { kind: 'done', replayed: false }
        : { kind: 'retry', reason: 'the handler failed' };
    const { status } = answer;
    if (status === undefined || options.shouldStore(status, error))
      return { kind: 'done', replayed: false };
    return mayPassLater(status)
      ? { kind: 'retry', reason: `the handler failed (${status})` }
      : { kind: 'drop', reason: `the handler refused the message (${status})` };
  }

  /** Every value the handler answered: Nest sends each to the caller, so each is stored. */
  async result(answered: Observable<unknown>): Promise<unknown> {
    const values = await lastValueFrom(answered.pipe(toArray()));
    return values.length === 1 ? values[0] : new MessageReplies(values);
  }

  /** What the first caller receives for a `result`: each value the handler answered. */
  answer(result: unknown): Observable<unknown> {
    return result instanceof MessageReplies ? from(result.values) : of(result);
  }

  replay(context: ExecutionContext, stored: StoredResponse): Observable<unknown> {
    const body = decodeBody(stored);
    if (!stored.isError) {
      return stored.headers['rpc-replies'] === 'several' && Array.isArray(body)
        ? from(body)
        : of(body);
    }
    const domainError = (body as Partial<StoredDomainError> | null)?.domainError;
    if (typeof domainError === 'string')
      throw this.exceptions.thrownAgain(
        context.getHandler(),
        context.getClass(),
        domainError,
        undefined,
        stored.status,
      );
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

  /**
   * Acknowledges the message. Nest runs every handler of an event for each of its messages, with
   * one context: when several of them acknowledge, the message is settled once, when the last of
   * them has (see `together`), since a second `ack` of one message makes RabbitMQ close the channel.
   */
  settled(context: ExecutionContext, settled: SettledMessage, options: ResolvedRouteOptions): void {
    const { acknowledge } = options;
    if (!acknowledge) return;
    const message: unknown = context.switchToRpc().getContext();
    const handlers = this.sharedEvents.get(context.getHandler());
    if (handlers === undefined || typeof message !== 'object' || message === null) {
      acknowledge(message, settled);
      return;
    }
    const settlements = [...(this.pendingSettlements.get(message) ?? []), settled];
    if (settlements.length < handlers) {
      this.pendingSettlements.set(message, settlements);
      return;
    }
    this.pendingSettlements.delete(message);
    acknowledge(message, together(settlements));
  }

  /**
   * Told at startup of every `@Idempotent()` handler with an `acknowledge`: the event handlers
   * among them that share an event settle its messages together (see `settled`). A handler of
   * several patterns is left out (which of them a message matched is not known here).
   */
  acknowledgingHandlers(handlers: readonly Function[]): void {
    const byEvent = new Map<string, number>();
    const events = new Map<Function, string>();
    for (const handler of handlers) {
      const patterns = Reflect.getMetadata(PATTERN_METADATA, handler) as unknown[] | undefined;
      if (!isEventHandler(handler) || patterns?.length !== 1) continue;
      const event = patternOf(handler);
      events.set(handler, event);
      byEvent.set(event, (byEvent.get(event) ?? 0) + 1);
    }
    for (const [handler, event] of events) {
      const count = byEvent.get(event)!;
      if (count > 1) this.sharedEvents.set(handler, count);
    }
  }

  /**
   * A thrown error as the handler's answer: an RpcException (with the status of its `statusCode`,
   * if it has one), an HttpException as on HTTP; `undefined` for anything else (a crash).
   */
  private answerOf(error: unknown): ErrorAnswer | undefined {
    if (microservices && error instanceof microservices.RpcException) {
      const body = error.getError();
      const statusCode = (body as { statusCode?: unknown } | null)?.statusCode;
      const status =
        typeof statusCode === 'number' && statusCode >= 400 && statusCode < 600
          ? statusCode
          : undefined;
      return { status, value: { rpcError: body } satisfies StoredRpcError };
    }
    if (error instanceof HttpException)
      return { status: error.getStatus(), value: error.getResponse() };
    return undefined;
  }

  /**
   * The handler's endpoint: its class, method and pattern (and its transport, if it names one),
   * so two handlers of one class name and method name — in two modules, or minified — differ.
   */
  private endpointOf(context: ExecutionContext): string {
    const controller = context.getClass();
    const handler = context.getHandler();
    const known = this.endpoints.get(handler);
    if (known?.controller === controller) return known.endpoint;
    const pattern = patternOf(handler);
    const endpoint = boundedColumnValue(
      `RPC ${controller.name}.${handler.name}${pattern ? ` ${pattern}` : ''}`,
    );
    this.endpoints.set(handler, { controller, endpoint });
    const first = this.handlers.get(endpoint);
    if (!first) this.handlers.set(endpoint, { controller, handler });
    else if (first.controller !== controller || first.handler !== handler) {
      this.logger.warn(
        `Two message handlers share the endpoint "${endpoint}": their keys are one key space, so a message handled by one is a duplicate to the other. Give one of them another class or method name.`,
      );
    }
    return endpoint;
  }
}

/** The handler's patterns as Nest's decorators recorded them, and its transport if it names one. */
function patternOf(handler: Function): string {
  const patterns = Reflect.getMetadata(PATTERN_METADATA, handler) as unknown[] | undefined;
  // Nest's `Transport` enum (a number), or a custom transport's symbol.
  const transport = Reflect.getMetadata(TRANSPORT_METADATA, handler) as number | symbol | undefined;
  const text =
    patterns === undefined
      ? ''
      : patterns.length === 1 && typeof patterns[0] === 'string'
        ? patterns[0]
        : (canonicalJson(patterns) ?? '');
  if (transport === undefined) return text;
  const name =
    typeof transport === 'symbol'
      ? transport.description
      : (microservices?.Transport as Record<number, string> | undefined)?.[transport];
  return `${text} (${name ?? String(transport)})`;
}

/**
 * A header's values in the message, by lower-case name, where its transport has headers: AMQP
 * headers, NATS headers, MQTT 5 user properties, Kafka headers (Redis and TCP have none). One per
 * time it was sent (empty ones left out); none when it is absent.
 */
export function transportHeader(context: unknown, name: string): readonly string[] {
  const rpc = context as BrokerContext | null | undefined;
  if (!rpc) return [];
  const message = rpc.getMessage?.();
  if (typeof rpc.getPartition === 'function') return texts(header(message?.headers, name));
  if (message?.properties) return texts(header(message.properties.headers, name));
  if (typeof rpc.getHeaders === 'function') {
    // NATS headers: `values` matches the name exactly, so every name of any case is looked up.
    const headers = rpc.getHeaders();
    const fields = headers?.keys?.().filter((candidate) => candidate.toLowerCase() === name) ?? [];
    return fields.flatMap((field) =>
      texts(headers?.values ? headers.values(field) : headers?.get?.(field)),
    );
  }
  if (typeof rpc.getPacket === 'function')
    return texts(header(rpc.getPacket()?.properties?.userProperties, name));
  return [];
}

/** Each value of a header (an array when repeated) as text, empty ones left out. */
function texts(value: unknown): string[] {
  const values: unknown[] = Array.isArray(value) ? value : [value];
  return values.flatMap((one) => {
    const read = text(one);
    return read === undefined ? [] : [read];
  });
}

/** The message's own identity, where its transport has one (see RpcTransport). */
export function transportKey(context: unknown): string | undefined {
  const rpc = context as BrokerContext | null | undefined;
  if (!rpc) return undefined;
  const message = rpc.getMessage?.();
  if (typeof rpc.getPartition === 'function') {
    // Kafka: a header, else the message's place in the log (stable across redeliveries).
    return (
      text(header(message?.headers, 'idempotency-key')) ??
      `${rpc.getTopic?.()}/${rpc.getPartition()}/${message?.offset}`
    );
  }
  if (message?.properties) {
    // RabbitMQ: a header (the sender's deliberate key), else the message_id property — which some
    // clients set to a new id on every publish, so that a republished copy would not match.
    return (
      text(header(message.properties.headers, 'idempotency-key')) ??
      text(message.properties.messageId)
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

/**
 * What is read of each broker's context and message, member by member (each broker has its own
 * shape): Kafka's `getMessage()` (headers, offset) with `getPartition()`/`getTopic()`, RabbitMQ's
 * `getMessage()` (properties), NATS's `getHeaders()`, MQTT's `getPacket()` (MQTT 5 user properties).
 */
interface BrokerContext {
  getMessage?(): BrokerMessage | null | undefined;
  getPartition?(): number;
  getTopic?(): string;
  getHeaders?():
    | { keys?(): string[]; values?(name: string): unknown[]; get?(name: string): unknown }
    | undefined;
  getPacket?(): { properties?: { userProperties?: Record<string, unknown> } } | undefined;
}

interface BrokerMessage {
  /** Kafka's headers and place in the log. */
  headers?: Record<string, unknown> | null;
  offset?: string;
  /** AMQP's properties. */
  properties?: { headers?: Record<string, unknown> | null; messageId?: unknown };
}

/** A header by name in any case (`Idempotency-Key`, `idempotency-key`). */
function header(headers: Record<string, unknown> | null | undefined, name: string): unknown {
  if (!headers) return undefined;
  if (headers[name] !== undefined) return headers[name];
  for (const field of Object.keys(headers)) if (field.toLowerCase() === name) return headers[field];
  return undefined;
}

function text(value: unknown): string | undefined {
  const first: unknown = Array.isArray(value) ? value[0] : value;
  if (Buffer.isBuffer(first)) return first.toString('utf8') || undefined;
  // An AMQP header is typed: an integer key arrives as a number (as a payload field may).
  if (typeof first === 'number' && Number.isSafeInteger(first)) return String(first);
  return typeof first === 'string' && first !== '' ? first : undefined;
}
