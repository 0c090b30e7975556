import { fork, type ChildProcess } from 'node:child_process';

/** Runner → app: one command, answered by a reply with the same id. */
export interface ChildCommand {
  readonly id: number;
  readonly cmd: string;
}

export type ChildReply =
  | { readonly id: number; readonly ok: true; readonly result: unknown }
  | { readonly id: number; readonly ok: false; readonly error: string };

/** An app under load in its own process: our app (app-process.ts) or the peer (peer-app.cjs). */
export interface ChildApp {
  readonly name: string;
  readonly port: number;
  readonly pid: number;
  command<T>(cmd: string): Promise<T>;
  stop(): Promise<void>;
}

export interface StartChildOptions {
  readonly name: string;
  readonly script: string;
  readonly args?: readonly string[];
  readonly cwd?: string;
  readonly env?: Record<string, string>;
  readonly readyTimeoutMs?: number;
}

/**
 * Forks an app, waits for its `{ type: 'ready', port }` message and returns a handle to drive it.
 * `--expose-gc` lets the app force a collection before reporting its RSS.
 */
export function startChild(options: StartChildOptions): Promise<ChildApp> {
  const child = fork(options.script, [...(options.args ?? [])], {
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    // BENCH_CPU_PROF_DIR=dir writes a V8 CPU profile of each app (open it in Chrome DevTools).
    execArgv: [
      '--expose-gc',
      ...(process.env.BENCH_CPU_PROF_DIR
        ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF_DIR}`]
        : []),
    ],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill();
      reject(
        new Error(`${options.name} did not start within ${options.readyTimeoutMs ?? 60_000} ms`),
      );
    }, options.readyTimeoutMs ?? 60_000);
    const onExit = (code: number | null) => {
      clearTimeout(timer);
      reject(new Error(`${options.name} exited with code ${code} before it was ready`));
    };
    child.once('exit', onExit);
    child.on('message', function onReady(message: { type?: string; port?: number }) {
      if (message?.type !== 'ready' || typeof message.port !== 'number') return;
      clearTimeout(timer);
      child.off('exit', onExit);
      child.off('message', onReady);
      resolve(handleOf(options.name, child, message.port));
    });
  });
}

function handleOf(name: string, child: ChildProcess, port: number): ChildApp {
  let nextId = 1;
  const pending = new Map<
    number,
    { resolve: (value: any) => void; reject: (error: Error) => void }
  >();
  child.on('message', (reply: ChildReply) => {
    const waiter = reply && typeof reply.id === 'number' ? pending.get(reply.id) : undefined;
    if (!waiter) return;
    pending.delete(reply.id);
    if (reply.ok) waiter.resolve(reply.result);
    else waiter.reject(new Error(`${name}: ${reply.error}`));
  });
  child.on('exit', (code) => {
    for (const waiter of pending.values())
      waiter.reject(new Error(`${name} exited (code ${code})`));
    pending.clear();
  });
  return {
    name,
    port,
    pid: child.pid!,
    command<T>(cmd: string): Promise<T> {
      const id = nextId++;
      return new Promise<T>((resolve, reject) => {
        pending.set(id, { resolve, reject });
        child.send({ id, cmd } satisfies ChildCommand);
      });
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      // A polite close first (the app closes its pool and deletes the peer's Redis keys), then a kill.
      const closing = this.command('close').catch(() => undefined);
      const killTimer = setTimeout(() => child.kill('SIGKILL'), 30_000);
      await closing;
      await exited;
      clearTimeout(killTimer);
    },
  };
}
