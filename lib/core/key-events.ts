import type { RecordId } from '../storage/idempotency-store.interface.js';
import type { Decision } from './types.js';

/**
 * What the core tells observers about keys: one typed stream that metrics, logs and traces
 * subscribe to (see `lib/observability/`). The core never counts, logs or traces itself.
 */
export type KeyEvent =
  /** A request's key was decided (the final decision, after any wait). */
  | { readonly type: 'decided'; readonly id: RecordId; readonly action: Decision['action'] }
  /** A claim took over an expired record (TTL over, or an abandoned in-progress lock). */
  | { readonly type: 'taken-over'; readonly id: RecordId }
  /** A duplicate found its key in progress and waits for it (`concurrency: 'wait'`). */
  | { readonly type: 'waiting'; readonly id: RecordId; readonly remainingMs: number }
  /** A claim answered after its request had been refused (storeTimeout) was released. */
  | { readonly type: 'late-claim-released'; readonly id: RecordId }
  /** A stored response cannot be opened (`reason` never contains the body). */
  | { readonly type: 'unreadable'; readonly id: RecordId; readonly reason: string }
  /** A key was given up after a result that is not stored. */
  | { readonly type: 'released'; readonly id: RecordId }
  /** A running handler's claim was found taken over; `consequence` says what that meant. */
  | { readonly type: 'lease-lost'; readonly id: RecordId; readonly consequence: string }
  /** A renewal failed (the store threw or timed out); the next beat tries again. */
  | { readonly type: 'renewal-failed'; readonly id: RecordId; readonly error: unknown }
  /** No renewal was confirmed for lockTimeout: the key may be taken over. Renewal goes on. */
  | { readonly type: 'renewal-lapsed'; readonly id: RecordId; readonly lockTimeoutMs: number }
  /** The handler ran for lockRenewalLimit and is presumed hung: renewal stopped. */
  | {
      readonly type: 'renewal-limit';
      readonly id: RecordId;
      readonly lockRenewalLimitMs: number;
      readonly lockTimeoutMs: number;
    }
  /** Storing a result (or releasing a key) failed on every attempt: the key stays locked. */
  | {
      readonly type: 'write-failed';
      readonly id: RecordId;
      readonly what: string;
      readonly attempts: number;
      readonly error: unknown;
    }
  /** A release found the record completed by a transaction whose COMMIT's answer was lost. */
  | { readonly type: 'commit-answer-lost'; readonly id: RecordId }
  /** A transactional route's database connection failed while it ran; nothing was committed. */
  | { readonly type: 'connection-lost'; readonly id: RecordId; readonly cause: unknown };

/** A subscriber to the key's events. Must not throw (the stream ignores what it throws). */
export type KeyEventListener = (event: KeyEvent) => void;

/** What a traced step may say about itself. */
export interface TracedStep {
  /** Sets the step's outcome (`idempotency.outcome` on its span). */
  outcome(outcome: string): void;
}

/** The steps of a key a tracer can wrap: the claim, the handler's run, the completion or release. */
export type KeyStep = 'claim' | 'run' | 'complete';

/**
 * A tracer of steps: the only observer that wraps work instead of hearing of it afterwards (a span
 * has a start and an end, and the run's span is the handler's parent). Asked `active()` first: when
 * it says no, the step runs as if nobody traced it.
 */
export interface StepTracer {
  /** Whether spans would be recorded now (a tracer provider is registered). */
  active(): boolean;
  /** Runs `work` in the span of `step` for record `id` (the active span inside it, with `active`). */
  step<T>(
    step: KeyStep,
    id: RecordId,
    work: (traced: TracedStep) => Promise<T>,
    active: boolean,
  ): Promise<T>;
}

/** A step nobody traces: its outcome goes nowhere. */
export const UNTRACED: TracedStep = { outcome: () => undefined };

/**
 * The stream of a key's events. Emitting costs a loop over the listeners (metrics and logs, as the
 * module wires it); a step costs nothing beyond `work` unless a tracer is attached and active.
 */
export class KeyEvents {
  private listeners: readonly KeyEventListener[] = [];
  private tracer: StepTracer | undefined;

  /** Adds a listener; returns the function that removes it. */
  subscribe(listener: KeyEventListener): () => void {
    this.listeners = [...this.listeners, listener];
    return () => {
      this.listeners = this.listeners.filter((other) => other !== listener);
    };
  }

  /** Attaches the tracer of steps (one per stream; `undefined` detaches it). */
  traceWith(tracer: StepTracer | undefined): void {
    this.tracer = tracer;
  }

  /** Whether anyone listens: an event that is costly to build may be skipped when nobody does. */
  get listened(): boolean {
    return this.listeners.length > 0;
  }

  /** Tells every listener; a listener that throws changes nothing for the key. */
  emit(event: KeyEvent): void {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch {
        // Observing never changes an outcome (listeners report their own failures).
      }
    }
  }

  /** Whether steps are traced now (a tracer is attached and active). */
  get tracing(): boolean {
    return this.tracer?.active() ?? false;
  }

  /** Runs `work` as `step` of record `id`: traced when a tracer is attached and active. */
  step<T>(
    step: KeyStep,
    id: RecordId,
    work: (traced: TracedStep) => Promise<T>,
    active = false,
  ): Promise<T> {
    const tracer = this.tracer;
    return tracer?.active() ? tracer.step(step, id, work, active) : work(UNTRACED);
  }
}
