export {
  IdempotencyRunner,
  type CompiledCallOptions,
  type IdempotentCallOptions,
  type IdempotentRunContext,
  type IdempotentRunOptions,
  type IdempotentRunResult,
} from './idempotency-runner.js';
export {
  IdempotentMethod,
  IDEMPOTENT_METHOD_OPTIONS,
  type IdempotentMethodOptions,
} from './idempotent-method.decorator.js';
