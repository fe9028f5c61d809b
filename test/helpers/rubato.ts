// The `rubato` command as a test runs it: bin/rubato as a tracked process whose JSON-line events
// (--events) are collected as they come.
import { RUBATO_COMMAND } from '../../src/setup/index.ts';
import { spawnTracked, type TrackedProcess } from '../../src/util/procs.ts';
import { LineSplitter } from '../../src/util/async.ts';

export type Ev = Record<string, unknown>;
export const RUBATO_BIN = RUBATO_COMMAND;

export function rubatoProcess(name: string, args: string[], logLevel = 'warn'): { proc: TrackedProcess; events: Ev[] } {
  const proc = spawnTracked(name, RUBATO_BIN, args, { env: { ...process.env, RUBATO_LOG: logLevel } });
  const events: Ev[] = [];
  const lines = new LineSplitter((l) => { try { events.push(JSON.parse(l) as Ev); } catch { /* not an event */ } });
  proc.child.stdout?.on('data', (d: Buffer) => lines.push(d));
  return { proc, events };
}

export const alive = (pid: number): boolean => { try { process.kill(pid, 0); return true; } catch { return false; } };
