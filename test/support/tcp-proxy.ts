import net from 'node:net';

/** `up`: forwards. `cut`: connections destroyed, new ones refused. `blackhole`: connections stay open, nothing moves. */
export type ProxyMode = 'up' | 'cut' | 'blackhole';

interface Pair {
  readonly client: net.Socket;
  upstream?: net.Socket;
  /** Stalled: what the client sent since, held back until `releaseStalls()`. */
  held?: Buffer[];
  /** The server's answer to the statement just sent is dropped, and the connection cut. */
  dropReply?: boolean;
}

/** A statement to act on, by a pattern of its bytes, for at most `remaining` more matches. */
interface Rule {
  readonly pattern: RegExp;
  remaining: number;
}

/**
 * A TCP proxy between an app and its database, to stage outages:
 * - `cut()`: every connection is destroyed and the port stops listening (connects are refused);
 * - `blackhole()`: connections stay open (new ones are accepted) but no byte is forwarded in either
 *   direction, so queries hang; what was sent waits in the socket buffers;
 * - `restore()`: forwards again. After a blackhole the held bytes flow on, so queries sent during
 *   the outage reach the database late, as when a network partition heals.
 *
 * And, one statement at a time (matched by a pattern of the bytes the client sends: its SQL text,
 * or the name of a prepared statement):
 * - `stall(pattern)`: the connection that sends a matching statement stops forwarding it (and what
 *   follows) until `releaseStalls()`, while every other connection works: a statement stuck on a
 *   half-dead connection;
 * - `dropReplyTo(pattern)`: the statement reaches the database and runs, and its answer is dropped
 *   and the connection cut: a reply lost after the statement committed.
 */
export class TcpProxy {
  private server: net.Server | undefined;
  private readonly pairs = new Set<Pair>();
  private mode: ProxyMode = 'up';
  /** Connections accepted, and destroyed by a cut, since the start. */
  readonly counts = {
    accepted: 0,
    destroyedByCut: 0,
    heldByBlackhole: 0,
    stalled: 0,
    repliesDropped: 0,
  };
  private readonly stallRules: Rule[] = [];
  private readonly dropRules: Rule[] = [];

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

  /** The next `times` statements matching `pattern` stall their connection (see the class). */
  stall(pattern: RegExp, times = Infinity): void {
    this.stallRules.push({ pattern, remaining: times });
  }

  /** Forwards what the stalled connections held back, and stops stalling. */
  releaseStalls(): void {
    this.stallRules.length = 0;
    for (const pair of this.pairs) {
      const held = pair.held;
      if (!held) continue;
      pair.held = undefined;
      for (const chunk of held) pair.upstream?.write(chunk);
    }
  }

  /** The answers to the next `times` statements matching `pattern` are lost (see the class). */
  dropReplyTo(pattern: RegExp, times = 1): void {
    this.dropRules.push({ pattern, remaining: times });
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
    client.on('data', (chunk: Buffer) => this.forward(pair, chunk));
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

  /** Client to server, unless a rule stalls the connection or marks its answer to be dropped. */
  private forward(pair: Pair, chunk: Buffer): void {
    if (pair.held) {
      pair.held.push(chunk);
      return;
    }
    const text = chunk.toString('latin1');
    const matching = (rules: Rule[]) => {
      const rule = rules.find(
        (candidate) => candidate.remaining > 0 && candidate.pattern.test(text),
      );
      if (rule) rule.remaining--;
      return rule !== undefined;
    };
    if (matching(this.stallRules)) {
      this.counts.stalled++;
      pair.held = [chunk];
      return;
    }
    if (matching(this.dropRules)) pair.dropReply = true;
    pair.upstream?.write(chunk);
  }

  private connectUpstream(pair: Pair): void {
    const upstream = net.connect(this.target);
    pair.upstream = upstream;
    upstream.on('data', (chunk) => {
      if (pair.dropReply) {
        // The statement ran (a single statement commits before its answer is sent): lose the answer.
        this.counts.repliesDropped++;
        pair.client.destroy();
        upstream.destroy();
        return;
      }
      pair.client.write(chunk);
    });
    upstream.on('error', () => undefined);
    upstream.on('close', () => pair.client.destroy());
  }
}
