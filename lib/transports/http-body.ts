import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { IdempotencyRejectionError, rejection } from '../errors/idempotency-rejection.js';
import type { FileFingerprint } from '../utils/fingerprint.js';

/**
 * The request body as the fingerprint needs it, when the platform's body parsers did not give it:
 * an upload that multer (FileInterceptor) parsed, or a body nobody has read yet (a multipart body
 * whose FileInterceptor runs after the idempotency interceptor, or that the handler reads itself).
 */

/**
 * The most of an unread body read ahead, into memory, to fingerprint it before whoever parses it
 * (multer, the handler). A larger one is refused (400 `body-unreadable`); with FileInterceptor
 * running first (see the README), multer's own storage and limits apply instead.
 */
export const MAX_READ_AHEAD_BYTES = 10 * 1024 * 1024;

/** A request stream (Express's request, Fastify's `request.raw`): Node's IncomingMessage. */
type RequestStream = Readable & {
  readonly headers: Readonly<Record<string, string | string[] | undefined>>;
  readonly complete?: boolean;
};

/** What is read of a request for its body: Express's and Fastify's members, each optional. */
export interface BodyRequest {
  readonly raw?: unknown;
  readonly file?: unknown;
  readonly files?: unknown;
}

/** An uploaded file as multer describes it (memory storage: `buffer`; disk storage: `path`). */
interface MulterFile {
  readonly fieldname?: string;
  readonly originalname?: string;
  readonly mimetype?: string;
  readonly buffer?: unknown;
  readonly path?: unknown;
}

/**
 * The request's stream when it carries a body that no one has started reading: the parsers the
 * platform runs (JSON, urlencoded) read theirs before the route; a multipart body waits for its
 * FileInterceptor, or for the handler.
 */
export function unreadBody(request: BodyRequest): RequestStream | undefined {
  const stream = (request.raw ?? request) as Partial<RequestStream>;
  // Read already (the path of nearly every request: the platform's JSON parser read it).
  if (stream.readableDidRead || stream.readableFlowing || stream.readableEnded || stream.destroyed)
    return undefined;
  const headers = stream.headers;
  if (typeof stream.read !== 'function' || !headers) return undefined;
  const length = Number(headers['content-length'] ?? 0);
  if (!(length > 0) && headers['transfer-encoding'] === undefined) return undefined;
  return stream as RequestStream;
}

/**
 * Reads all of `stream` and puts it back (`unshift`), so whoever reads the request next (multer,
 * the handler) gets it whole: the body, boundaries of a multipart body made neutral (a retry
 * sends the same parts under another random boundary).
 */
export function readAhead(stream: RequestStream): Promise<Buffer> {
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const finish = (failure?: string) => {
      stream.off('readable', onReadable);
      stream.off('end', onEnd);
      stream.off('error', onFailure);
      stream.off('close', onFailure);
      if (failure !== undefined) {
        // Drained, so the connection can answer the refusal.
        stream.resume();
        reject(new IdempotencyRejectionError(rejection('body-unreadable', { detail: failure })));
        return;
      }
      const body = Buffer.concat(chunks, size);
      // Before 'end' is emitted (it is not, while the stream holds data again).
      if (size > 0) stream.unshift(body);
      resolve(neutralBoundaries(body, stream.headers['content-type']));
    };
    const onReadable = () => {
      let chunk: Buffer | null;
      while ((chunk = stream.read() as Buffer | null) !== null) {
        chunks.push(chunk);
        size += chunk.length;
        if (size > MAX_READ_AHEAD_BYTES) {
          return finish(
            `The request body is larger than ${MAX_READ_AHEAD_BYTES / 1024 / 1024} MiB, too large to be read before it is parsed and compared with later retries.`,
          );
        }
      }
      // The whole message is in (IncomingMessage.complete), and all of it was read.
      if (stream.complete) finish();
    };
    // An empty body may end without a 'readable' event.
    const onEnd = () => finish();
    const onFailure = () => finish('The request body ended before it was complete.');
    stream.on('readable', onReadable);
    stream.on('end', onEnd);
    stream.on('error', onFailure);
    stream.on('close', onFailure);
  });
}

/** A multipart body with its boundary replaced by a fixed one: the same parts, the same bytes. */
function neutralBoundaries(body: Buffer, contentType: string | string[] | undefined): Buffer {
  const match = /^multipart\/[^;]*;(?:.*;)?\s*boundary=(?:"([^"]+)"|([^\s;]+))/i.exec(
    String(contentType ?? ''),
  );
  if (!match) return body;
  const delimiter = Buffer.from(`--${match[1] ?? match[2]}`, 'latin1');
  const neutral = Buffer.from('--nestjs-idempotency-boundary', 'latin1');
  const parts: Buffer[] = [];
  let start = 0;
  for (let at = body.indexOf(delimiter); at !== -1; at = body.indexOf(delimiter, start)) {
    parts.push(body.subarray(start, at), neutral);
    start = at + delimiter.length;
  }
  parts.push(body.subarray(start));
  return Buffer.concat(parts);
}

/** The files multer put on the request (`file`, or `files` as a list or by field), in order. */
export function uploadedFiles(request: BodyRequest): MulterFile[] {
  const { file, files } = request;
  if (!file && !files) return [];
  const list: unknown[] = file ? [file] : [];
  if (Array.isArray(files)) list.push(...(files as unknown[]));
  else if (files && typeof files === 'object')
    for (const field of Object.values(files) as unknown[])
      if (Array.isArray(field)) list.push(...(field as unknown[]));
  return list.filter((candidate): candidate is MulterFile => typeof candidate === 'object');
}

/**
 * What identifies each uploaded file: its field, name and type as the client sent them, and a
 * digest of its content, hashed from memory (multer's memory storage) or from disk (disk storage).
 * A file kept elsewhere (a storage engine such as multer-s3) cannot be compared: refused, as the
 * server's configuration, not the request, is at fault.
 */
export async function fingerprintsOf(
  files: readonly MulterFile[],
  route: string,
): Promise<FileFingerprint[]> {
  return Promise.all(
    files.map(async (file) => {
      const hash = createHash('sha256');
      if (Buffer.isBuffer(file.buffer)) hash.update(file.buffer);
      else if (typeof file.path === 'string') {
        for await (const chunk of createReadStream(file.path)) hash.update(chunk as Buffer);
      } else {
        throw new Error(
          `nestjs-idempotency cannot fingerprint the uploaded file ${JSON.stringify(String(file.fieldname))} of ${route}: its storage engine kept neither a buffer nor a path, so a retry with another file could not be told apart. ` +
            "Use multer's memoryStorage() or diskStorage() on this route, or let @Idempotent() run before the upload interceptor (on the controller, or written below @UseInterceptors(FileInterceptor(...))), which fingerprints the upload as it arrives.",
        );
      }
      return {
        field: String(file.fieldname ?? ''),
        name: String(file.originalname ?? ''),
        type: String(file.mimetype ?? ''),
        sha256: hash.digest('hex'),
      };
    }),
  );
}
