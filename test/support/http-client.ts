import http from 'node:http';

/** One HTTP exchange as a client saw it; `error` when no response arrived (reset, timeout). */
export interface Exchange {
  readonly status: number;
  readonly headers: http.IncomingHttpHeaders;
  readonly text: string;
  readonly elapsedMs: number;
  readonly error?: string;
}

export interface SendOptions {
  readonly method?: string;
  readonly headers?: Record<string, string>;
  readonly body?: string | object;
  /** The exchange is abandoned (error 'deadline') if no full response arrived by then. */
  readonly deadlineMs?: number;
}

/**
 * A keep-alive HTTP/1.1 client for one server, for storms: `maxSockets` connections, reused. Never
 * throws: a request that gets no response resolves with `status: 0` and `error`.
 */
export class HttpClient {
  private readonly agent: http.Agent;
  private readonly url: URL;

  constructor(baseUrl: string, maxSockets = 64) {
    this.url = new URL(baseUrl);
    this.agent = new http.Agent({ keepAlive: true, maxSockets });
  }

  send(path: string, options: SendOptions = {}): Promise<Exchange> {
    const started = performance.now();
    const payload =
      options.body === undefined
        ? undefined
        : typeof options.body === 'string'
          ? options.body
          : JSON.stringify(options.body);
    const headers: Record<string, string> = {
      ...(payload !== undefined && typeof options.body !== 'string'
        ? { 'Content-Type': 'application/json' }
        : {}),
      ...(payload !== undefined ? { 'Content-Length': String(Buffer.byteLength(payload)) } : {}),
      ...options.headers,
    };
    return new Promise<Exchange>((resolve) => {
      let settled = false;
      const finish = (exchange: Omit<Exchange, 'elapsedMs'>) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve({ ...exchange, elapsedMs: performance.now() - started });
      };
      const request = http.request(
        {
          host: this.url.hostname,
          port: this.url.port,
          path,
          method: options.method ?? 'POST',
          headers,
          agent: this.agent,
        },
        (response) => {
          const chunks: Buffer[] = [];
          response.on('data', (chunk: Buffer) => chunks.push(chunk));
          response.on('end', () =>
            finish({
              status: response.statusCode ?? 0,
              headers: response.headers,
              text: Buffer.concat(chunks).toString('utf8'),
            }),
          );
          response.on('error', (error) =>
            finish({ status: 0, headers: {}, text: '', error: error.message }),
          );
        },
      );
      const timer = setTimeout(() => {
        finish({ status: 0, headers: {}, text: '', error: 'deadline' });
        request.destroy();
      }, options.deadlineMs ?? 60_000);
      request.on('error', (error: NodeJS.ErrnoException) =>
        finish({ status: 0, headers: {}, text: '', error: error.code ?? error.message }),
      );
      request.end(payload);
    });
  }

  /** POST a JSON body with an Idempotency-Key. */
  post(
    path: string,
    key: string,
    body: object,
    headers: Record<string, string> = {},
    deadlineMs?: number,
  ) {
    return this.send(path, { body, headers: { 'Idempotency-Key': key, ...headers }, deadlineMs });
  }

  close(): void {
    this.agent.destroy();
  }
}

/** The body as JSON, or undefined when it is not JSON. */
export function jsonOf(exchange: Exchange): any {
  try {
    return JSON.parse(exchange.text);
  } catch {
    return undefined;
  }
}

export const isReplay = (exchange: Exchange) => exchange.headers['idempotent-replayed'] === 'true';

export const isProblem = (exchange: Exchange) =>
  /^application\/problem\+json/.test(String(exchange.headers['content-type'] ?? ''));
