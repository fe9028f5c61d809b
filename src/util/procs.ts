// Every child process Rubato starts goes through here: tracked by PID, ended by PID on shutdown,
// on error and on test failure, and tied to our own life with PR_SET_PDEATHSIG (via setpriv) so a
// SIGKILLed controller leaves nothing behind. Never kills by name.

import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { logger } from './log.ts';
import { LineSplitter } from './async.ts';

const log = logger('procs');
const live = new Map<number, { name: string; child: ChildProcess }>();
let hooked = false;

const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));

/**
 * Orderly shutdown on SIGINT/SIGTERM/SIGHUP: the hooks run first (newest first: a controller says
 * goodbye to its peer and stops its guest), bounded by SHUTDOWN_GRACE_MS; then every tracked child
 * still alive is killed by PID and the process exits. A second signal skips the wait.
 */
const shutdownHooks: Array<() => Promise<void>> = [];
let SHUTDOWN_GRACE_MS = 10_000;

/** An orderly stop may take this much longer (a guest's ACPI shutdown: its --stop-timeout). */
export function extendShutdownGrace(ms: number): void {
  SHUTDOWN_GRACE_MS = Math.max(SHUTDOWN_GRACE_MS, 10_000 + ms);
}
let shuttingDown = false;

export function onShutdown(hook: () => Promise<void>): () => void {
  hookExit();
  shutdownHooks.push(hook);
  return () => {
    const i = shutdownHooks.indexOf(hook);
    if (i >= 0) shutdownHooks.splice(i, 1);
  };
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => killAllSync());
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      const code = sig === 'SIGINT' ? 130 : 143;
      if (shuttingDown) {
        killAllSync();
        process.exit(code);
      }
      shuttingDown = true;
      const hooks = [...shutdownHooks].reverse();
      if (hooks.length) log.info(`${sig}: stopping in order`);
      // An orderly stop that completed exits 0 (a service manager's "stop" succeeded).
      const all = (async () => {
        let ok = hooks.length > 0;
        for (const h of hooks) {
          try {
            await h();
          } catch (e) {
            ok = false;
            log.warn(`shutdown step failed: ${e instanceof Error ? e.message : String(e)}`);
          }
        }
        return ok ? 0 : code;
      })();
      const grace = new Promise<number>((r) =>
        setTimeout(() => {
          log.warn(`orderly stop took over ${SHUTDOWN_GRACE_MS} ms; ending what is left`);
          r(code);
        }, SHUTDOWN_GRACE_MS).unref(),
      );
      void Promise.race([all, grace]).then((exitCode) => {
        killAllSync();
        process.exit(exitCode);
      });
    });
  }
}

export interface TrackedProcess {
  readonly name: string;
  readonly pid: number;
  readonly child: ChildProcess;
  /** Resolves with the exit code (or signal name) once the process has ended. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(signal?: NodeJS.Signals): void;
  /** SIGTERM, then SIGKILL after graceMs; resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

export function spawnTracked(
  name: string,
  file: string,
  args: readonly string[],
  opts: SpawnOptions & {
    /**
     * A process that may outlive us once `disown`ed (a VM handed back to its owner): no death
     * signal tied to our exit, its own session. Until disowned it is tracked and ended like any.
     */
    outlive?: boolean;
  } = {},
): TrackedProcess {
  hookExit();
  const { outlive, ...spawnOpts } = opts;
  const [cmd, argv] =
    SETPRIV && !outlive ? [SETPRIV, ['--pdeathsig', 'SIGKILL', '--', file, ...args]] : [file, [...args]];
  const child = spawn(cmd, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(outlive ? { detached: true } : {}),
    ...spawnOpts,
  });
  if (child.pid === undefined) {
    // spawn failures surface through 'error'; give them a pid-less tracked object that is already dead
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once('error', () => resolve({ code: -1, signal: null }));
    });
    return {
      name,
      pid: -1,
      child,
      exited,
      kill: () => {},
      stop: async () => {
        await exited;
      },
    };
  }
  const pid = child.pid;
  live.set(pid, { name, child });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      live.delete(pid);
      resolve({ code, signal });
    });
  });
  log.debug('spawned', { name, pid });
  const kill = (signal: NodeJS.Signals = 'SIGKILL') => {
    if (live.has(pid)) {
      try {
        process.kill(pid, signal);
      } catch {
        /* already gone */
      }
    }
  };
  const stop = async (graceMs = 2000) => {
    if (!live.has(pid)) {
      await exited;
      return;
    }
    kill('SIGTERM');
    const timer = setTimeout(() => kill('SIGKILL'), graceMs);
    await exited;
    clearTimeout(timer);
  };
  return { name, pid, child, exited, kill, stop };
}

/**
 * The first process with an open file descriptor that `test` accepts (given the PID and the fd's
 * number, as /proc/PID/fd and /proc/PID/fdinfo name it), or null. Processes and descriptors that
 * go away meanwhile, or are not ours to read, are skipped.
 */
export function processWithFd(test: (pid: string, fd: string) => boolean): number | null {
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (test(pid, fd)) return Number(pid);
      } catch {
        /* closed meanwhile */
      }
    }
  }
  return null;
}

/** Lets a process spawned with `outlive` run on after we exit (it is no longer ours to end). */
export function disown(p: TrackedProcess): void {
  live.delete(p.pid);
  p.child.unref();
}

export function liveProcesses(): Array<{ pid: number; name: string }> {
  return [...live.entries()].map(([pid, v]) => ({ pid, name: v.name }));
}

export function killAllSync(): void {
  for (const [pid] of live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

/** Runs a command to completion, collecting output; for setup steps and helpers. */
export function runCommand(
  file: string,
  args: readonly string[],
  opts: SpawnOptions & { onLine?: (line: string) => void; timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const { onLine, timeoutMs, ...spawnOpts } = opts;
  const p = spawnTracked(file.split('/').pop() ?? file, file, args, spawnOpts);
  let stdout = '';
  let stderr = '';
  const lines = onLine ? new LineSplitter(onLine) : null;
  p.child.stdout?.on('data', (d: Buffer) => {
    stdout += d.toString();
  });
  p.child.stderr?.on('data', (d: Buffer) => {
    const s = d.toString();
    stderr += s;
    if (stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19));
    lines?.push(s);
  });
  // A time limit of our own (killed by PID; a `timeout` wrapper killed at our exit would leave its child running).
  let timedOut = false;
  const timer =
    timeoutMs === undefined
      ? null
      : setTimeout(() => {
          timedOut = true;
          p.kill('SIGKILL');
        }, timeoutMs);
  return new Promise((resolve) => {
    p.child.once('error', (e) => {
      if (timer) clearTimeout(timer);
      resolve({ code: -1, stdout, stderr: stderr + String(e) });
    });
    void p.exited.then(({ code }) => {
      if (timer) clearTimeout(timer);
      resolve(
        timedOut
          ? { code: 124, stdout, stderr: `${stderr}\n(timed out after ${timeoutMs} ms)` }
          : { code: code ?? -1, stdout, stderr },
      );
    });
  });
}
