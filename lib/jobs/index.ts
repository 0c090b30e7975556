export { IdempotentWorkerHost, type IdempotentJobOptions } from './idempotent-worker-host.js';
