import net from 'node:net';

/** `up`: forwards. `cut`: connections destroyed, new ones refused. `blackhole`: connections stay open, nothing moves. */
export type ProxyMode = 'up' | 'cut' | 'blackhole';

interface Pair {
  readonly client: net.Socket;
  upstream?: net.Socket;
}

/**
 * A TCP proxy between an app and its database, to stage outages:
 * - `cut()`: every connection is destroyed and the port stops listening (connects are refused);
 * - `blackhole()`: connections stay open (new ones are accepted) but no byte is forwarded in either
 *   direction, so queries hang; what was sent waits in the socket buffers;
 * - `restore()`: forwards again. After a blackhole the held bytes flow on, so queries sent during
 *   the outage reach the database late, as when a network partition heals.
 */
export class TcpProxy {
  private server: net.Server | undefined;
  private readonly pairs = new Set<Pair>();
  private mode: ProxyMode = 'up';
  /** Connections accepted, and destroyed by a cut, since the start. */
  readonly counts = { accepted: 0, destroyedByCut: 0, heldByBlackhole: 0 };

  private constructor(
    private target: { host: string; port: number },
    public port: number,
  ) {}

  /** New connections go to `target` from now on (a failover); existing ones are left as they are. */
  retarget(target: { host: string; port: number }): void {
    this.target = target;
  }

  static async start(target: { host: string; port: number }): Promise<TcpProxy> {
    const proxy = new TcpProxy(target, 0);
    await proxy.listen();
    return proxy;
  }

  /** `url` (postgres://user@host:port/db) with its host and port replaced by the proxy's. */
  proxiedUrl(url: string): string {
    const parsed = new URL(url);
    parsed.hostname = '127.0.0.1';
    parsed.port = String(this.port);
    return parsed.toString();
  }

  get state(): ProxyMode {
    return this.mode;
  }

  cut(): Promise<void> {
    this.mode = 'cut';
    for (const pair of this.pairs) {
      this.counts.destroyedByCut++;
      pair.client.destroy();
      pair.upstream?.destroy();
    }
    this.pairs.clear();
    const server = this.server;
    this.server = undefined;
    return new Promise((resolve) => (server ? server.close(() => resolve()) : resolve()));
  }

  blackhole(): void {
    this.mode = 'blackhole';
    for (const pair of this.pairs) {
      this.counts.heldByBlackhole++;
      pair.client.pause();
      pair.upstream?.pause();
    }
  }

  async restore(): Promise<void> {
    const previous = this.mode;
    this.mode = 'up';
    if (previous === 'cut') await this.listen();
    for (const pair of this.pairs) {
      if (!pair.upstream) this.connectUpstream(pair);
      pair.client.resume();
      pair.upstream!.resume();
    }
  }

  async close(): Promise<void> {
    await this.cut();
  }

  private listen(): Promise<void> {
    const server = net.createServer((client) => this.accept(client));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.port, '127.0.0.1', () => {
        this.port = (server.address() as net.AddressInfo).port;
        resolve();
      });
    });
  }

  private accept(client: net.Socket): void {
    this.counts.accepted++;
    const pair: Pair = { client };
    this.pairs.add(pair);
    client.on('data', (chunk) => pair.upstream?.write(chunk));
    client.on('error', () => undefined);
    client.on('close', () => {
      this.pairs.delete(pair);
      pair.upstream?.destroy();
    });
    if (this.mode === 'blackhole') {
      this.counts.heldByBlackhole++;
      client.pause();
      return;
    }
    this.connectUpstream(pair);
  }

  private connectUpstream(pair: Pair): void {
    const upstream = net.connect(this.target);
    pair.upstream = upstream;
    upstream.on('data', (chunk) => pair.client.write(chunk));
    upstream.on('error', () => undefined);
    upstream.on('close', () => pair.client.destroy());
  }
}
