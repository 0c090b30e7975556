export {
  checkConformance,
  DRAFT,
  type CheckResult,
  type CheckStatus,
  type ConformanceOptions,
  type ConformanceReport,
} from './conformance-checks.js';
