import type { INestApplication } from '@nestjs/common';
import { DocumentBuilder, SwaggerModule } from '@nestjs/swagger';

/** Where the sample serves Swagger UI (`/docs`) and the OpenAPI document (`/docs-json`). */
export const API_DOCS_PATH = 'docs';

/**
 * Swagger UI for the sample. The library documents each `@Idempotent()` route itself (the
 * `Idempotency-Key` header and its 400, 409, 422 and 503 problems; README "OpenAPI"), so this
 * only names the API and the `X-Api-Key` scope header.
 */
export function serveApiDocs(app: INestApplication): void {
  const config = new DocumentBuilder()
    .setTitle('Sample shop')
    .setDescription(
      'Payments, orders and transfers made safe to retry by nestjs-idempotency. Send an ' +
        '`Idempotency-Key` (one per logical operation, the same on every retry): a retry gets ' +
        'the first response back with `Idempotent-Replayed: true`; the same key with another body ' +
        'is 422; a duplicate still running is 409 (or, on POST /payments, waits for the first).',
    )
    .setVersion('0.1')
    .addApiKey({ type: 'apiKey', in: 'header', name: 'X-Api-Key' }, 'api-key')
    // Swagger UI sends an authorised key only to operations whose security names its scheme;
    // the empty alternative keeps the key optional.
    .addSecurityRequirements('api-key')
    .addSecurityRequirements({})
    .build();
  SwaggerModule.setup(API_DOCS_PATH, app, () => SwaggerModule.createDocument(app, config));
}
