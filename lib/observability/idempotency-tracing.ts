import { Logger } from '@nestjs/common';
import { UNTRACED, type KeyStep, type StepTracer, type TracedStep } from '../core/key-events.js';
import type { RecordId } from '../storage/idempotency-store.interface.js';

type OpenTelemetryApi = typeof import('@opentelemetry/api');

export type { TracedStep };

/** The spans of the module: `idempotency.claim`, `idempotency.run` and `idempotency.complete`. */
export type TracedStepName = KeyStep;

/**
 * OpenTelemetry spans around the steps of a key — the claim (with the decision as its outcome),
 * the handler's run, and the completion or release — when the optional peer `@opentelemetry/api`
 * is installed. Spans join the active trace (the request's span, with the HTTP instrumentation),
 * and the run's span is active while the handler runs, so the handler's own spans nest under it.
 * Without the package, or without a registered tracer provider, tracing costs next to nothing.
 */
export class IdempotencyTracing implements StepTracer {
  private readonly tracer;
  private failureLogged = false;
  /** The tracer provider OpenTelemetry delegates to while none is registered. */
  private readonly noProvider: unknown;

  private constructor(private readonly api: OpenTelemetryApi | null) {
    this.tracer = api?.trace.getTracer('nestjs-idempotency');
    this.noProvider = api ? new api.ProxyTracerProvider().getDelegate() : undefined;
  }

  /**
   * Whether a tracer provider is registered: without one a step is not even begun (no span, no
   * context), so tracing costs a property read. Steps still check that their span records
   * (sampling).
   */
  active(): boolean {
    const { api } = this;
    if (!api || !this.tracer) return false;
    try {
      const provider = api.trace.getTracerProvider();
      return (
        !(provider instanceof api.ProxyTracerProvider) || provider.getDelegate() !== this.noProvider
      );
    } catch {
      // Let `step` find out, and log it once.
      return true;
    }
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
   * as `work` set it, or `error`). Tracing never changes what `work` does or returns: a tracer, a
   * span processor or an exporter that throws is logged once, and the step goes on untraced.
   */
  async step<T>(
    step: TracedStepName,
    id: RecordId,
    work: (traced: TracedStep) => Promise<T>,
    active = false,
  ): Promise<T> {
    const { api, tracer } = this;
    if (!api || !tracer) return work(UNTRACED);
    const span = this.quietly(() =>
      tracer.startSpan(`idempotency.${step}`, {
        attributes: { 'idempotency.endpoint': id.endpoint, 'idempotency.key': id.key },
      }),
    );
    if (!span) return work(UNTRACED);
    // No tracer provider registered, or not sampled: nothing to record, nothing to make active.
    if (!this.quietly(() => span.isRecording())) {
      this.quietly(() => span.end());
      return work(UNTRACED);
    }
    let outcomeSet = false;
    const traced: TracedStep = {
      outcome: (outcome) => {
        outcomeSet = true;
        this.quietly(() => span.setAttribute('idempotency.outcome', outcome));
      },
    };
    try {
      const activeContext = active
        ? this.quietly(() => api.trace.setSpan(api.context.active(), span))
        : undefined;
      return activeContext
        ? await api.context.with(activeContext, () => work(traced))
        : await work(traced);
    } catch (error) {
      if (!outcomeSet) traced.outcome('error');
      this.quietly(() => {
        span.recordException(error instanceof Error ? error : String(error));
        span.setStatus({
          code: api.SpanStatusCode.ERROR,
          message: error instanceof Error ? error.message : undefined,
        });
      });
      throw error;
    } finally {
      this.quietly(() => span.end());
    }
  }

  /** Runs a call into OpenTelemetry; if it throws, logs that once and returns `undefined`. */
  private quietly<T>(call: () => T): T | undefined {
    try {
      return call();
    } catch (error) {
      if (!this.failureLogged) {
        this.failureLogged = true;
        try {
          new Logger('Idempotency').error(
            `OpenTelemetry threw while tracing a step (${(error as Error)?.message ?? String(error)}); ignored, here and from now on: tracing does not change a request's outcome.`,
          );
        } catch {
          // The app's logger threw too.
        }
      }
      return undefined;
    }
  }
}
