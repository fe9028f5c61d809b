// A Rubato command run as a child process (a controller on a namespace host, or a client) whose
// JSON-line events are collected and can be waited for; its stderr is shown, prefixed with its name.

import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { type TrackedProcess, LineSplitter, RubatoError, spawnTracked } from '../util/index.ts';
import { REPO_ROOT, RUBATO_COMMAND } from '../setup/index.ts';

export type Ev = Record<string, unknown> & { event: string; t: number };

/** A child's stderr shown on ours, line by line, each line prefixed with the child's name. */
export function showStderr(name: string, proc: TrackedProcess): void {
  const lines = new LineSplitter((l) => process.stderr.write(`  [${name}] ${l}\n`));
  proc.child.stderr?.setEncoding('utf8');
  proc.child.stderr?.on('data', (d: string) => lines.push(d));
}

export class Controller {
  readonly events: Ev[] = [];
  private waiters: Array<{ pred: (e: Ev) => boolean; resolve: (e: Ev) => void }> = [];
  constructor(
    readonly name: string,
    readonly proc: TrackedProcess,
    public onEvent: (e: Ev) => void = () => {},
  ) {
    // (an event line may be long: a status with many VMs)
    const lines = new LineSplitter((line) => this.onLine(line), 1 << 20);
    proc.child.stdout?.setEncoding('utf8');
    proc.child.stdout?.on('data', (d: string) => lines.push(d));
    showStderr(name, proc);
  }
  private onLine(line: string): void {
    let e: Ev;
    try {
      e = JSON.parse(line) as Ev;
    } catch {
      return;
    }
    this.events.push(e);
    if (this.events.length > 50_000) this.events.splice(0, 10_000);
    this.onEvent(e);
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred(e)) return true;
      w.resolve(e);
      return false;
    });
  }
  waitEvent(pred: (e: Ev) => boolean, timeoutMs: number, what: string): Promise<Ev> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const t = setTimeout(
        () => reject(new RubatoError('RUBATO_PEER_LOST', `${this.name}: no ${what} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.waiters.push({
        pred,
        resolve: (e) => {
          clearTimeout(t);
          resolve(e);
        },
      });
      void this.proc.exited.then(() => {
        clearTimeout(t);
        reject(new RubatoError('RUBATO_PEER_LOST', `${this.name} controller exited while waiting for ${what}`));
      });
    });
  }
}

/**
 * Starts processes inside network namespaces (a test topology's hosts and clients), tracked in
 * `procs`: the caller ends them by PID, last first.
 */
export function nsLauncher(procs: TrackedProcess[]) {
  const env = { ...process.env, RUBATO_LOG: process.env['RUBATO_LOG'] ?? 'warn' };
  const tsx = pathToFileURL(join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs')).href;
  const spawnIn = (name: string, ns: string, file: string, argv: string[]): TrackedProcess => {
    const p = spawnTracked(name, 'ip', ['netns', 'exec', ns, file, ...argv], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    procs.push(p);
    return p;
  };
  return {
    spawnIn,
    /** A controller run as an operator runs it: bin/rubato (which execs node: the PID is the controller's). */
    rubato: (name: string, ns: string, args: string[], onEvent?: (e: Ev) => void) =>
      new Controller(name, spawnIn(`rubato-${name}`, ns, RUBATO_COMMAND, args), onEvent),
    /** The web client (http-client.ts) fetching `path` from `target`; `body`: each answer's start in its line. */
    httpClient: (name: string, ns: string, target: string, path: string, body = false) =>
      new Controller(
        name,
        spawnIn(name, ns, process.execPath, [
          '--import',
          tsx,
          join(REPO_ROOT, 'src', 'chaos', 'http-client.ts'),
          '--target',
          target,
          '--path',
          path,
          ...(body ? ['--body', '1'] : []),
        ]),
      ),
  };
}
