import { Body, Controller, HttpCode, Module, Post, type INestApplication } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  ApiConflictResponse,
  ApiCreatedResponse,
  ApiHeader,
  ApiProperty,
  DocumentBuilder,
  SwaggerModule,
  type OpenAPIObject,
} from '@nestjs/swagger';
import request from 'supertest';
import { Idempotent, IdempotencyModule, type IdempotencyModuleOptions } from '../lib/index.js';
import { startAppProcess, type AppProcess } from './support/processes.js';
import { newKey } from './support/http.js';

class PaymentDto {
  @ApiProperty()
  id!: string;
  @ApiProperty()
  amount!: number;
}

@Controller('payments')
class PaymentsController {
  @Post()
  @Idempotent()
  @ApiCreatedResponse({ description: 'The payment', type: PaymentDto })
  create(@Body() body: { amount: number }): PaymentDto {
    return { id: 'pay_1', amount: body.amount };
  }

  @Post('optional')
  @Idempotent({ required: false })
  createOptional(): PaymentDto {
    return { id: 'pay_2', amount: 1 };
  }

  /** The developer documents a 409 of their own: it stays theirs. */
  @Post('refunds')
  @Idempotent()
  @ApiConflictResponse({ description: 'Already refunded' })
  refund() {
    return { refunded: true };
  }

  @Post('confirm')
  @HttpCode(200)
  @Idempotent({ replayStatus: 200 })
  confirm() {
    return { confirmed: true };
  }

  @Post('capture')
  @Idempotent({ replayStatus: 200 })
  capture() {
    return { captured: true };
  }

  @Post('described')
  @Idempotent()
  @ApiHeader({ name: 'Idempotency-Key', description: 'Our own words', required: true })
  described() {
    return { described: true };
  }

  @Post('plain')
  plain() {
    return { plain: true };
  }
}

/** `@Idempotent()` on the controller, with the module deciding whether the key is required. */
@Controller('orders')
@Idempotent()
class OrdersController {
  @Post()
  create() {
    return { id: 'ord_1' };
  }

  @Post('urgent')
  @Idempotent({ required: true })
  createUrgent() {
    return { id: 'ord_2' };
  }
}

type Operation = {
  parameters?: Array<Record<string, any>>;
  responses: Record<string, Record<string, any>>;
};

const PROBLEM = 'application/problem+json';
const TAG = 'tag:nestjs-idempotency,2026:';

async function documentOf(options: Partial<IdempotencyModuleOptions> = {}) {
  @Module({
    imports: [
      IdempotencyModule.forRoot({
        // Not PGlite: one instance per process, closed for every app when one app closes it.
        dataSource: { type: 'better-sqlite3', database: ':memory:' },
        purgeInterval: false,
        ...options,
      }),
    ],
    controllers: [PaymentsController, OrdersController],
  })
  class OpenApiModule {}
  const app = await NestFactory.create(OpenApiModule, { logger: false });
  // As apps do it: the document is built before init()/listen().
  const document = SwaggerModule.createDocument(app, new DocumentBuilder().build());
  return { app, document };
}

function post(document: OpenAPIObject, path: string): Operation {
  const operation = document.paths[path]?.post;
  if (!operation) throw new Error(`no POST ${path} in the document`);
  return operation as Operation;
}

function keyHeaders(operation: Operation) {
  return (operation.parameters ?? []).filter(
    (parameter) => parameter.in === 'header' && parameter.name.toLowerCase() === 'idempotency-key',
  );
}

describe('OpenAPI document (@nestjs/swagger)', () => {
  let app: INestApplication;
  let document: OpenAPIObject;
  beforeAll(async () => {
    ({ app, document } = await documentOf());
  });
  afterAll(() => app.close());

  it('documents the Idempotency-Key header, required or optional per route', () => {
    expect(keyHeaders(post(document, '/payments'))).toEqual([
      {
        name: 'Idempotency-Key',
        in: 'header',
        required: true,
        description: expect.stringContaining('on every retry'),
        schema: expect.objectContaining({ type: 'string', minLength: 1, maxLength: 255 }),
      },
    ]);
    expect(keyHeaders(post(document, '/payments/optional'))).toEqual([
      expect.objectContaining({ name: 'Idempotency-Key', in: 'header', required: false }),
    ]);
    expect(keyHeaders(post(document, '/orders'))).toEqual([
      expect.objectContaining({ name: 'Idempotency-Key', required: true }),
    ]);
    expect(keyHeaders(post(document, '/orders/urgent'))).toHaveLength(1);
  });

  it('documents 400, 409, 422 and 503 as RFC 9457 problems', () => {
    const { responses } = post(document, '/payments');
    for (const status of ['400', '409', '422', '503']) {
      const content = responses[status].content;
      expect(Object.keys(content)).toEqual([PROBLEM]);
      expect(content[PROBLEM].schema).toMatchObject({
        type: 'object',
        required: ['type', 'title', 'status', 'detail'],
        properties: {
          type: { type: 'string', format: 'uri' },
          title: { type: 'string' },
          status: { type: 'integer', enum: [Number(status)] },
          detail: { type: 'string' },
        },
      });
    }
    const typesOf = (status: string) =>
      responses[status].content[PROBLEM].schema.properties.type.enum;
    expect(typesOf('400')).toEqual([
      `${TAG}key-missing`,
      `${TAG}key-invalid`,
      `${TAG}body-unreadable`,
    ]);
    expect(typesOf('409')).toEqual([`${TAG}request-in-progress`]);
    expect(typesOf('422')).toEqual([`${TAG}key-reused`]);
    expect(typesOf('503')).toEqual([`${TAG}store-unavailable`]);
    expect(Object.keys(responses['409'].headers)).toEqual(['Retry-After']);
    expect(Object.keys(responses['503'].headers)).toEqual(['Retry-After']);
    expect(responses['422'].headers).toBeUndefined();
  });

  it('has no key-missing 400 where the key is optional', () => {
    const { responses } = post(document, '/payments/optional');
    expect(responses['400'].content[PROBLEM].schema.properties.type.enum).toEqual([
      `${TAG}key-invalid`,
      `${TAG}body-unreadable`,
    ]);
  });

  it("keeps the handler's own success documentation and marks it as replayable", () => {
    const created = post(document, '/payments').responses['201'];
    expect(created.description).toBe('The payment');
    expect(created.content).toEqual({
      'application/json': { schema: { $ref: '#/components/schemas/PaymentDto' } },
    });
    expect(created.headers['Idempotent-Replayed']).toMatchObject({
      schema: { type: 'string', enum: ['true'] },
    });
    // No response documented: swagger's own success status stays, with the replay header.
    const optional = post(document, '/payments/optional').responses;
    expect(Object.keys(optional)).toEqual(['201', '400', '409', '422', '503']);
    expect(Object.keys(optional['201'].headers)).toEqual(['Idempotent-Replayed']);
    expect(Object.keys(post(document, '/payments/confirm').responses)).toEqual([
      '200',
      '400',
      '409',
      '422',
      '503',
    ]);
  });

  it('documents the replayStatus of a route as a replayable response', () => {
    const { responses } = post(document, '/payments/capture');
    expect(Object.keys(responses)).toEqual(['200', '201', '400', '409', '422', '503']);
    expect(responses['200'].description).toMatch(/replay/i);
    expect(Object.keys(responses['200'].headers)).toEqual(['Idempotent-Replayed']);
  });

  it("keeps the developer's own Idempotency-Key header", () => {
    expect(keyHeaders(post(document, '/payments/described'))).toEqual([
      expect.objectContaining({ description: 'Our own words', required: true }),
    ]);
  });

  it('leaves a status the developer documented as theirs (a stored 409 replays too)', () => {
    const conflict = post(document, '/payments/refunds').responses['409'];
    expect(conflict.description).toBe('Already refunded');
    expect(conflict.content).toBeUndefined();
    expect(Object.keys(conflict.headers)).toEqual(['Idempotent-Replayed']);
  });

  it('adds nothing to a route without @Idempotent()', () => {
    const plain = post(document, '/payments/plain');
    expect(keyHeaders(plain)).toEqual([]);
    expect(plain.responses).toEqual({ '201': { description: '' } });
  });

  it('follows the module-wide required option in a second app of the same process', async () => {
    const second = await documentOf({ required: false });
    try {
      for (const path of ['/orders', '/payments']) {
        expect(keyHeaders(post(second.document, path))).toEqual([
          expect.objectContaining({ required: false }),
        ]);
      }
      // A route's own option still wins (here a method's over its controller's).
      expect(keyHeaders(post(second.document, '/orders/urgent'))).toEqual([
        expect.objectContaining({ required: true }),
      ]);
      // Nothing doubled by documenting the same classes again.
      expect(post(second.document, '/payments').responses['201'].description).toBe('The payment');
      expect(post(second.document, '/payments/refunds').responses['409'].description).toBe(
        'Already refunded',
      );
    } finally {
      await second.app.close();
    }
  });

  it('documents what the route does', async () => {
    await app.init();
    const missing = await request(app.getHttpServer()).post('/payments').send({ amount: 1 });
    expect(missing.status).toBe(400);
    expect(missing.headers['content-type']).toMatch(/^application\/problem\+json/);
    const documented = post(document, '/payments').responses['400'].content[PROBLEM];
    expect(documented.schema.properties.type.enum).toContain(missing.body.type);
    const key = newKey();
    await request(app.getHttpServer())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send({ amount: 1 })
      .expect(201);
    const replay = await request(app.getHttpServer())
      .post('/payments')
      .set('Idempotency-Key', key)
      .send({ amount: 1 })
      .expect(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
  });
});

describe('without @nestjs/swagger installed', () => {
  let server: AppProcess;
  afterAll(() => server?.stop());

  it('boots, replays, and logs no error', async () => {
    server = await startAppProcess('test/fixtures/swagger-free-server.js', {});
    // The child could not resolve @nestjs/swagger: the proof is not vacuous.
    expect(server.output()).toMatch(/@nestjs\/swagger: ERR_MODULE_NOT_FOUND/);
    const key = newKey();
    const first = await fetch(`${server.baseUrl}/charges`, charge(key));
    expect(first.status).toBe(201);
    const firstBody = await first.json();
    const replay = await fetch(`${server.baseUrl}/charges`, charge(key));
    expect(replay.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.json()).toEqual(firstBody);
    const count = await (await fetch(`${server.baseUrl}/charges/count`)).json();
    expect(count).toEqual({ executions: 1 });
    expect(server.output()).not.toMatch(/\b(ERROR|WARN)\b/);
  });

  function charge(key: string): RequestInit {
    return {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      body: JSON.stringify({ amount: 5 }),
    };
  }
});
