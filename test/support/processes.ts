import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** An app running in a Node process of its own. */
export interface AppProcess {
  readonly child: ChildProcess;
  readonly baseUrl: string;
  /** Everything it printed so far, stdout and stderr. */
  output(): string;
  /** Resolves once its output matches `pattern`; rejects after `timeoutMs` or if it exits first. */
  waitForOutput(pattern: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  /** Stops it (SIGTERM, or SIGKILL for a crash) and waits for it to exit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts a compiled script (path under dist/, as `npm test` builds it; or an absolute path, for an
 * app outside the project such as an installed package fixture) and resolves once it prints
 * `listening <port>` (or what `listening` matches, the port its first group).
 */
export async function startAppProcess(
  script: string,
  env: Record<string, string>,
  listening = /listening (\d+)/,
): Promise<AppProcess> {
  const path = isAbsolute(script) ? script : `${ROOT}dist/${script}`;
  if (!existsSync(path))
    throw new Error(`${path} is missing: run \`npm test\` (it compiles first)`);
  const child = spawn(process.execPath, [path], {
    env: { ...process.env, ...env, NODE_OPTIONS: '' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const port = await new Promise<number>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const match = listening.exec(output);
      if (match) resolve(Number(match[1]));
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.once('exit', (code) =>
      reject(new Error(`${script} exited (${code}) before listening:\n${output}`)),
    );
    child.once('error', (error) =>
      reject(new Error(`${script} could not be started: ${error.message}`)),
    );
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    child,
    baseUrl: `http://127.0.0.1:${port}`,
    output: () => output,
    waitForOutput(pattern: RegExp, timeoutMs = 10_000) {
      return new Promise<RegExpExecArray>((resolve, reject) => {
        const check = () => {
          const match = pattern.exec(output);
          if (!match) return false;
          done();
          resolve(match);
          return true;
        };
        const onExit = () => {
          done();
          reject(new Error(`${script} exited before printing ${pattern}:\n${output}`));
        };
        const timer = setTimeout(() => {
          done();
          reject(
            new Error(`${script} did not print ${pattern} within ${timeoutMs} ms:\n${output}`),
          );
        }, timeoutMs);
        const done = () => {
          clearTimeout(timer);
          child.stdout!.off('data', check);
          child.stderr!.off('data', check);
          child.off('exit', onExit);
        };
        if (check()) return;
        child.stdout!.on('data', check);
        child.stderr!.on('data', check);
        child.once('exit', onExit);
      });
    },
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}
