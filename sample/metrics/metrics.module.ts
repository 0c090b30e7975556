import { Module } from '@nestjs/common';
import { IdempotencyPrometheus } from './idempotency-prometheus.js';
import { MetricsController } from './metrics.controller.js';

/**
 * `GET /metrics` for Prometheus. prom-client is a devDependency: the sample shows the wiring, the
 * library itself only offers `IdempotencyMetrics`.
 */
@Module({
  controllers: [MetricsController],
  providers: [IdempotencyPrometheus],
})
export class MetricsModule {}
