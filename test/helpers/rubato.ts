// The `rubato` command as a test runs it: bin/rubato as a tracked process whose JSON-line events
// (--events) are collected as they come.
import { RUBATO_COMMAND } from '../../src/setup/setup.ts';
import { spawnTracked, type TrackedProcess } from '../../src/util/procs.ts';
import { LineSplitter } from '../../src/util/async.ts';
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { writeKeyFile } from '../../src/replication/keyfile.ts';

export type Ev = Record<string, unknown>;
export const RUBATO_BIN = RUBATO_COMMAND;

/** `ns`: run it in that network namespace (`ip netns exec` execs it: the PID is the controller's). */
export function rubatoProcess(
  name: string,
  args: string[],
  logLevel = 'warn',
  ns?: string,
): { proc: TrackedProcess; events: Ev[] } {
  const env = { env: { ...process.env, RUBATO_LOG: logLevel } };
  const proc = ns
    ? spawnTracked(name, 'ip', ['netns', 'exec', ns, RUBATO_BIN, ...args], env)
    : spawnTracked(name, RUBATO_BIN, args, env);
  const events: Ev[] = [];
  const lines = new LineSplitter((l) => {
    try {
      events.push(JSON.parse(l) as Ev);
    } catch {
      /* not an event */
    }
  });
  proc.child.stdout?.on('data', (d: Buffer) => lines.push(d));
  return { proc, events };
}

/** Whether process `pid` runs (a zombie, dead but not yet reaped by its new parent, does not). */
export const alive = (pid: number): boolean => {
  try {
    return !/^\d+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, 'latin1'));
  } catch {
    return false;
  }
};

/**
 * A pre-shared key and a VM definition of the test guest (a slow memory dirtier) in `dir`, for a pair run by the
 * product commands.
 */
export function writeTestVm(
  dir: string,
  name: string,
  guest: { kernel: string; initrd: string },
): { key: string; vmFile: string } {
  const key = join(dir, 'psk');
  writeKeyFile(key);
  const vmFile = join(dir, 'vm.json');
  writeFileSync(
    vmFile,
    JSON.stringify({
      name,
      memoryMiB: 128,
      accelerator: 'auto',
      boot: {
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: 'console=ttyS0 quiet panic=-1 rubato.wl=dirtier,2,8',
      },
    }),
  );
  return { key, vmFile };
}
