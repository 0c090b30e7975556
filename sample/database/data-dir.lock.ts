import { closeSync, openSync, readFileSync, unlinkSync, writeSync } from 'node:fs';

/**
 * PGlite has no lock of its own: two processes on one data folder (`npm start` in two terminals)
 * would both write to it and corrupt it. A `<dataDir>.lock` file holding the owner's pid keeps the
 * second one out; a lock whose process is gone, or that names this very process, is stale and
 * taken over. (Two processes taking over the same stale lock at the same instant could both win;
 * good enough for a sample.)
 *
 * @returns a function that removes the lock
 */
export function lockDataDir(dataDir: string): () => void {
  const lockPath = `${dataDir}.lock`;
  for (;;) {
    try {
      const fd = openSync(lockPath, 'wx');
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return () => unlinkSync(lockPath);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
    const owner = Number(readFileSync(lockPath, 'utf8'));
    // Our own pid: left by an earlier run that was killed, whose pid this process got again (a
    // container's processes start under the same pids on every restart). This process cannot
    // hold the lock already: it opens one PGlite database at most (data-source.factory.ts).
    if (owner !== process.pid && isRunning(owner)) {
      throw new Error(
        `${dataDir} is in use by process ${owner} (lock file ${lockPath}). PGlite serves one process: stop that one, use another data folder, or set DATABASE_URL to share a PostgreSQL.`,
      );
    }
    unlinkSync(lockPath);
  }
}

function isRunning(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: the process exists but belongs to another user.
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}
