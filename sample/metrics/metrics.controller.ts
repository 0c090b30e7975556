import { Controller, Get, Header } from '@nestjs/common';
import { Registry } from 'prom-client';
import { IdempotencyPrometheus } from './idempotency-prometheus.js';

@Controller('metrics')
export class MetricsController {
  constructor(private readonly prometheus: IdempotencyPrometheus) {}

  /** Prometheus scrape endpoint (text exposition format). */
  @Get()
  @Header('Content-Type', Registry.PROMETHEUS_CONTENT_TYPE)
  scrape(): Promise<string> {
    return this.prometheus.registry.metrics();
  }
}
