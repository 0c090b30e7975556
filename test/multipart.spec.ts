import {
  Body,
  Controller,
  Headers,
  Module,
  Post,
  Req,
  UploadedFile,
  UploadedFiles,
  UseInterceptors,
  type INestApplication,
  type Type,
} from '@nestjs/common';
import { AnyFilesInterceptor, FileInterceptor } from '@nestjs/platform-express';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { Test } from '@nestjs/testing';
import { createHash, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import request from 'supertest';
import { DataSource } from 'typeorm';
import { Idempotent, IdempotencyModule, IdempotencyRecord } from '../lib/index.js';
import { recordsOf } from './fixtures/fixture-app.js';
import { CapturedLog } from './support/captured-log.js';
import { eachDatabase, type HttpPlatform } from './support/databases.js';
import { expectProblem, newKey } from './support/http.js';

/**
 * Uploads (multipart/form-data) under one key: the files (field, name, content) and the text
 * fields are the request, whichever of `@Idempotent()` and the upload interceptor runs first.
 * Express with multer (`FileInterceptor` of @nestjs/platform-express); on Fastify no multipart
 * plugin is installed here, so a route that leaves the multipart body to its handler, as
 * @fastify/multipart does.
 */

/** What multer gives a handler of an uploaded file (memory storage: `buffer`, disk: `path`). */
interface Upload {
  readonly fieldname: string;
  readonly originalname: string;
  readonly buffer?: Buffer;
  readonly path?: string;
}

const sha256 = (bytes: Buffer | string) => createHash('sha256').update(bytes).digest('hex');
const uploadDir = mkdtempSync(join(tmpdir(), 'nestjs-idempotency-uploads-'));

/** Handler runs, per route and key. */
const runs = new Map<string, number>();
const runsOf = (route: string, key: string) => runs.get(`${route} ${key}`) ?? 0;

/** Counts the run and answers with what the handler received. */
function received(route: string, key: string, files: Upload[], fields: unknown) {
  runs.set(`${route} ${key}`, runsOf(route, key) + 1);
  return {
    run: randomUUID(),
    files: files.map((file) => ({
      field: file.fieldname,
      name: file.originalname,
      sha256: sha256(file.buffer ?? readFileSync(file.path!)),
    })),
    fields: { ...(fields as object) },
  };
}

/** A storage engine that keeps the file elsewhere (as multer-s3 does): no buffer, no path. */
const remoteStorage = {
  _handleFile(_request: unknown, file: { stream: NodeJS.ReadableStream }, done: Function) {
    file.stream.resume();
    file.stream.on('end', () => done(null, { location: `remote://${randomUUID()}` }));
  },
  _removeFile(_request: unknown, _file: unknown, done: Function) {
    done(null);
  },
};

@Controller('uploads')
class UploadsController {
  /** FileInterceptor written below @Idempotent(): applied first, it runs first (multer, then us). */
  @Post('parsed-first')
  @Idempotent()
  @UseInterceptors(FileInterceptor('file'))
  parsedFirst(
    @Headers('idempotency-key') key: string,
    @UploadedFile() file: Upload,
    @Body() fields: unknown,
  ) {
    return received('parsed-first', key, [file], fields);
  }

  /** Written above @Idempotent(): the fingerprint is taken before multer has read the body. */
  @Post('idempotent-first')
  @UseInterceptors(FileInterceptor('file'))
  @Idempotent()
  idempotentFirst(
    @Headers('idempotency-key') key: string,
    @UploadedFile() file: Upload,
    @Body() fields: unknown,
  ) {
    return received('idempotent-first', key, [file], fields);
  }

  /** multer's disk storage: the file is hashed from its path. */
  @Post('disk')
  @Idempotent()
  @UseInterceptors(FileInterceptor('file', { dest: uploadDir }))
  disk(
    @Headers('idempotency-key') key: string,
    @UploadedFile() file: Upload,
    @Body() fields: unknown,
  ) {
    return received('disk', key, [file], fields);
  }

  /** Files under any field names. */
  @Post('any')
  @Idempotent()
  @UseInterceptors(AnyFilesInterceptor())
  any(
    @Headers('idempotency-key') key: string,
    @UploadedFiles() files: Upload[],
    @Body() fields: unknown,
  ) {
    return received('any', key, files, fields);
  }

  @Post('any-idempotent-first')
  @UseInterceptors(AnyFilesInterceptor())
  @Idempotent()
  anyIdempotentFirst(
    @Headers('idempotency-key') key: string,
    @UploadedFiles() files: Upload[],
    @Body() fields: unknown,
  ) {
    return received('any-idempotent-first', key, files, fields);
  }

  /** A file kept where the fingerprint cannot read it, once multer has run. */
  @Post('remote')
  @Idempotent()
  @UseInterceptors(FileInterceptor('file', { storage: remoteStorage }))
  remote(@Headers('idempotency-key') key: string, @Body() fields: unknown) {
    return received('remote', key, [], fields);
  }
}

/** `@Idempotent()` on the controller: it always runs before the method's FileInterceptor. */
@Controller('documents')
@Idempotent()
class DocumentsController {
  @Post()
  @UseInterceptors(FileInterceptor('file', { dest: uploadDir }))
  upload(
    @Headers('idempotency-key') key: string,
    @UploadedFile() file: Upload,
    @Body() fields: unknown,
  ) {
    return received('documents', key, [file], fields);
  }
}

/** Fastify: the handler reads the multipart body itself (request.raw), as with @fastify/multipart. */
@Controller('raw-uploads')
class RawUploadsController {
  @Post()
  @Idempotent()
  async upload(
    @Headers('idempotency-key') key: string,
    @Req() req: { raw: NodeJS.ReadableStream },
  ) {
    const chunks: Buffer[] = [];
    for await (const chunk of req.raw) chunks.push(chunk as Buffer);
    const body = Buffer.concat(chunks).toString('latin1');
    runs.set(`raw ${key}`, runsOf('raw', key) + 1);
    return { run: randomUUID(), complete: body.trimEnd().endsWith('--'), bytes: body.length };
  }
}

interface App {
  readonly app: INestApplication;
  readonly http: any;
  readonly dataSource: DataSource;
  readonly log: CapturedLog;
  close(): Promise<void>;
}

async function boot(platform: HttpPlatform, controllers: Type[]): Promise<App> {
  const pglite = eachDatabase.find(([name]) => name === 'pglite')![1];
  const dataSource = new DataSource({ ...pglite.options(), entities: [IdempotencyRecord] });
  await dataSource.initialize();
  @Module({
    imports: [IdempotencyModule.forRoot({ dataSource, purgeInterval: false })],
    controllers,
  })
  class AppModule {}
  const moduleRef = await Test.createTestingModule({ imports: [AppModule] }).compile();
  const log = new CapturedLog();
  const app =
    platform === 'fastify'
      ? moduleRef.createNestApplication(new FastifyAdapter(), { logger: log })
      : moduleRef.createNestApplication({ logger: log });
  if (platform === 'fastify') {
    // What @fastify/multipart registers: the body is left on the request for the handler to read.
    app
      .getHttpAdapter()
      .getInstance()
      .addContentTypeParser(
        'multipart/form-data',
        (_request: unknown, _payload: unknown, done: Function) => done(null, undefined),
      );
  }
  await app.init();
  if (platform === 'fastify') await app.getHttpAdapter().getInstance().ready();
  return {
    app,
    http: app.getHttpServer(),
    dataSource,
    log,
    async close() {
      await app.close();
      await dataSource.destroy();
    },
  };
}

/** One multipart request: files as [field, content, file name], and text fields. */
interface Form {
  readonly files: readonly (readonly [field: string, content: string, name: string])[];
  readonly fields?: Readonly<Record<string, string>>;
}

function upload(http: any, path: string, key: string, form: Form) {
  const call = request(http).post(path).set('Idempotency-Key', key);
  for (const [name, value] of Object.entries(form.fields ?? {})) call.field(name, value);
  for (const [field, content, name] of form.files)
    call.attach(field, Buffer.from(content), { filename: name, contentType: 'text/plain' });
  return call;
}

afterAll(() => rmSync(uploadDir, { recursive: true, force: true }));

describe('multipart uploads on express (multer)', () => {
  let app: App;
  beforeAll(async () => (app = await boot('express', [UploadsController, DocumentsController])));
  afterAll(() => app.close());

  const original: Form = {
    files: [['file', 'invoice 2026-001, 1000 EUR', 'invoice.txt']],
    fields: { note: 'March' },
  };

  /** Other requests under the same key; those with two files where the route takes several. */
  const others = (severalFiles: boolean): [string, Form][] => [
    [
      'another content',
      { ...original, files: [['file', 'invoice 2026-002, 9 EUR', 'invoice.txt']] },
    ],
    [
      'another file name',
      { ...original, files: [['file', 'invoice 2026-001, 1000 EUR', 'other.txt']] },
    ],
    ['other text fields', { ...original, fields: { note: 'April' } }],
    ['no text fields', { files: original.files }],
    ...(severalFiles
      ? ([
          ['a second file', { ...original, files: [...original.files, ['file', 'x', 'x.txt']] }],
          [
            'the same file under another field',
            { ...original, files: [['attachment', 'invoice 2026-001, 1000 EUR', 'invoice.txt']] },
          ],
        ] satisfies [string, Form][])
      : []),
  ];

  describe.each([
    ['FileInterceptor runs first, memory storage', '/uploads/parsed-first', 'parsed-first', false],
    [
      '@Idempotent() runs first, memory storage',
      '/uploads/idempotent-first',
      'idempotent-first',
      false,
    ],
    ['FileInterceptor runs first, disk storage', '/uploads/disk', 'disk', false],
    ['@Idempotent() on the controller, disk storage', '/documents', 'documents', false],
    ['AnyFilesInterceptor runs first', '/uploads/any', 'any', true],
    [
      '@Idempotent() runs before AnyFilesInterceptor',
      '/uploads/any-idempotent-first',
      'any-idempotent-first',
      true,
    ],
  ])('%s', (_case, path, route, severalFiles) => {
    it('replays the same upload, and the handler got the file once', async () => {
      const key = newKey();
      const first = await upload(app.http, path, key, original);
      expect(first.status).toBe(201);
      expect(first.body.files).toEqual([
        { field: 'file', name: 'invoice.txt', sha256: sha256('invoice 2026-001, 1000 EUR') },
      ]);
      expect(first.body.fields).toEqual({ note: 'March' });
      const retry = await upload(app.http, path, key, original);
      expect(retry.status).toBe(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.body).toEqual(first.body);
      expect(runsOf(route, key)).toBe(1);
    });

    it.each(others(severalFiles))(
      'answers 422 for the key reused with %s, and still replays the original',
      async (_what, other) => {
        const key = newKey();
        const first = await upload(app.http, path, key, original).expect(201);
        expectProblem(await upload(app.http, path, key, other), 422, 'key-reused');
        const retry = await upload(app.http, path, key, original);
        expect(retry.headers['idempotent-replayed']).toBe('true');
        expect(retry.body).toEqual(first.body);
        expect(runsOf(route, key)).toBe(1);
      },
    );
  });

  it('refuses, with a logged reason, a file its storage engine keeps where it cannot be read', async () => {
    const key = newKey();
    const response = await upload(app.http, '/uploads/remote', key, original);
    expect(response.status).toBe(500);
    expect(runsOf('remote', key)).toBe(0);
    expect(await recordsOf(app.dataSource, key)).toHaveLength(0);
    expect(app.log.lines.map((line) => line.text).join('\n')).toMatch(
      /cannot fingerprint the uploaded file "file" of UploadsController\.remote/,
    );
  });

  it('answers 400 for an upload too large to read before multer, without running the handler', async () => {
    const key = newKey();
    const large: Form = { files: [['file', 'x'.repeat(10 * 1024 * 1024 + 1), 'large.txt']] };
    const response = await upload(app.http, '/uploads/idempotent-first', key, large);
    expectProblem(response, 400, 'body-unreadable');
    expect(response.body.detail).toMatch(/larger than 10 MiB/);
    expect(runsOf('idempotent-first', key)).toBe(0);
  });
});

describe('multipart uploads on fastify, read by the handler', () => {
  let app: App;
  beforeAll(async () => (app = await boot('fastify', [RawUploadsController])));
  afterAll(() => app.close());

  const original: Form = { files: [['file', 'receipt 7', 'receipt.txt']], fields: { note: 'a' } };

  it('replays the same upload; the handler read the whole body', async () => {
    const key = newKey();
    const first = await upload(app.http, '/raw-uploads', key, original);
    expect(first.status).toBe(201);
    expect(first.body.complete).toBe(true);
    const retry = await upload(app.http, '/raw-uploads', key, original);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.body).toEqual(first.body);
    expect(runsOf('raw', key)).toBe(1);
  });

  it.each<[string, Form]>([
    ['another content', { ...original, files: [['file', 'receipt 8', 'receipt.txt']] }],
    ['another file name', { ...original, files: [['file', 'receipt 7', 'other.txt']] }],
    ['another field', { ...original, files: [['attachment', 'receipt 7', 'receipt.txt']] }],
    ['other text fields', { ...original, fields: { note: 'b' } }],
  ])('answers 422 for the key reused with %s', async (_what, other) => {
    const key = newKey();
    await upload(app.http, '/raw-uploads', key, original).expect(201);
    expectProblem(await upload(app.http, '/raw-uploads', key, other), 422, 'key-reused');
    expect(runsOf('raw', key)).toBe(1);
  });
});
