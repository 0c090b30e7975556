import { Logger } from '@nestjs/common';
import type { RecordId } from '../storage/idempotency-store.interface.js';

type OpenTelemetryApi = typeof import('@opentelemetry/api');
type Span = import('@opentelemetry/api').Span;

/** What a traced step may say about itself. */
export interface TracedStep {
  /** Sets `idempotency.outcome` on the step's span. */
  outcome(outcome: string): void;
}

const UNTRACED: TracedStep = { outcome: () => undefined };

/** The spans of the module: `idempotency.claim`, `idempotency.run` and `idempotency.complete`. */
export type TracedStepName = 'claim' | 'run' | 'complete';

/**
 * OpenTelemetry spans around the steps of a key — the claim (with the decision as its outcome),
 * the handler's run, and the completion or release — when the optional peer `@opentelemetry/api`
 * is installed. Spans join the active trace (the request's span, with the HTTP instrumentation),
 * and the run's span is active while the handler runs, so the handler's own spans nest under it.
 * Without the package, or without a registered tracer provider, tracing costs next to nothing.
 */
export class IdempotencyTracing {
  private readonly tracer;

  private constructor(private readonly api: OpenTelemetryApi | null) {
    this.tracer = api?.trace.getTracer('nestjs-idempotency');
  }

  /** Loads `@opentelemetry/api` if it is installed; otherwise steps run untraced. */
  static async load(): Promise<IdempotencyTracing> {
    try {
      return new IdempotencyTracing(await import('@opentelemetry/api'));
    } catch {
      new Logger('Idempotency').debug('@opentelemetry/api is not installed: no spans');
      return new IdempotencyTracing(null);
    }
  }

  /**
   * Runs `work` in the span `idempotency.<step>` of record `id`; with `active`, the span is the
   * active one inside `work`. A rejection marks the span as an error (with `idempotency.outcome`
   * as `work` set it, or `error`).
   */
  async step<T>(
    step: TracedStepName,
    id: RecordId,
    work: (traced: TracedStep) => Promise<T>,
    active = false,
  ): Promise<T> {
    const { api, tracer } = this;
    if (!api || !tracer) return work(UNTRACED);
    const span: Span = tracer.startSpan(`idempotency.${step}`, {
      attributes: { 'idempotency.endpoint': id.endpoint, 'idempotency.key': id.key },
    });
    // No tracer provider registered, or not sampled: nothing to record, nothing to make active.
    if (!span.isRecording()) {
      span.end();
      return work(UNTRACED);
    }
    let outcomeSet = false;
    const traced: TracedStep = {
      outcome: (outcome) => {
        outcomeSet = true;
        span.setAttribute('idempotency.outcome', outcome);
      },
    };
    try {
      return active
        ? await api.context.with(api.trace.setSpan(api.context.active(), span), () => work(traced))
        : await work(traced);
    } catch (error) {
      if (!outcomeSet) traced.outcome('error');
      span.recordException(error instanceof Error ? error : String(error));
      span.setStatus({
        code: api.SpanStatusCode.ERROR,
        message: error instanceof Error ? error.message : undefined,
      });
      throw error;
    } finally {
      span.end();
    }
  }
}
