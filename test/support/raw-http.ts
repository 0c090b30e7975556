import net from 'node:net';

/** A response read off the wire; `status: 0` when the server closed without answering. */
export interface RawResponse {
  readonly status: number;
  /** Lower-cased names; repeated headers joined with ", ". */
  readonly headers: Record<string, string>;
  readonly body: Buffer;
  readonly text: string;
}

/**
 * Sends bytes exactly as given over a fresh TCP connection and reads one response (to its
 * Content-Length, or until the server closes the connection). For requests Node's HTTP client refuses
 * to build: control characters, a header twice with odd spacing, non-ASCII bytes.
 */
export function rawRequest(port: number, bytes: Buffer, deadlineMs = 10_000): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    const chunks: Buffer[] = [];
    let settled = false;
    const settle = (outcome: () => RawResponse) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      try {
        resolve(outcome());
      } catch (error) {
        reject(error);
      }
    };
    const timer = setTimeout(() => {
      settled = true;
      socket.destroy();
      reject(new Error(`no response within ${deadlineMs} ms`));
    }, deadlineMs);
    // Not half-closed: a server that answers before reading the whole request (an error) might
    // otherwise reset the connection under its own response.
    socket.on('connect', () => socket.write(bytes));
    socket.on('data', (chunk) => {
      chunks.push(chunk);
      const response = completeResponse(Buffer.concat(chunks));
      if (response) settle(() => response);
    });
    // A server may reset a connection it refused before reading the whole request; what arrived counts.
    socket.on('error', () => undefined);
    socket.on('close', () => settle(() => parseResponse(Buffer.concat(chunks))));
  });
}

/** The response, once its head and (Content-Length) body have arrived. */
function completeResponse(raw: Buffer): RawResponse | undefined {
  const end = raw.indexOf('\r\n\r\n');
  if (end < 0) return undefined;
  const length = /\r\ncontent-length:\s*(\d+)/i.exec(raw.subarray(0, end).toString('latin1'));
  if (!length || raw.length < end + 4 + Number(length[1])) return undefined;
  return parseResponse(raw);
}

/** An HTTP/1.1 request: `headers` as [name, value] pairs (value bytes are latin-1), body as given. */
export function buildRequest(
  method: string,
  path: string,
  headers: readonly (readonly [string, string])[],
  body: Buffer | string = '',
): Buffer {
  const payload = typeof body === 'string' ? Buffer.from(body, 'utf8') : body;
  const head = [
    `${method} ${path} HTTP/1.1`,
    'Host: 127.0.0.1',
    'Connection: close',
    `Content-Length: ${payload.length}`,
    ...headers.map(([name, value]) => `${name}: ${value}`),
  ].join('\r\n');
  return Buffer.concat([Buffer.from(`${head}\r\n\r\n`, 'latin1'), payload]);
}

function parseResponse(raw: Buffer): RawResponse {
  if (raw.length === 0) return { status: 0, headers: {}, body: raw, text: '' };
  const end = raw.indexOf('\r\n\r\n');
  if (end < 0) throw new Error(`incomplete response: ${raw.toString('latin1').slice(0, 200)}`);
  const [statusLine, ...headerLines] = raw.subarray(0, end).toString('latin1').split('\r\n');
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? NaN);
  if (!Number.isInteger(status)) throw new Error(`bad status line: ${statusLine}`);
  const headers: Record<string, string> = {};
  for (const line of headerLines) {
    const colon = line.indexOf(':');
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
  }
  let body = raw.subarray(end + 4);
  if (/chunked/i.test(headers['transfer-encoding'] ?? '')) body = dechunk(body);
  else if (headers['content-length'] !== undefined)
    body = body.subarray(0, Number(headers['content-length']));
  return { status, headers, body, text: body.toString('utf8') };
}

function dechunk(data: Buffer): Buffer {
  const parts: Buffer[] = [];
  let offset = 0;
  for (;;) {
    const lineEnd = data.indexOf('\r\n', offset);
    if (lineEnd < 0) break;
    const size = parseInt(data.subarray(offset, lineEnd).toString('latin1'), 16);
    if (!(size > 0)) break;
    parts.push(data.subarray(lineEnd + 2, lineEnd + 2 + size));
    offset = lineEnd + 2 + size + 2;
  }
  return Buffer.concat(parts);
}
