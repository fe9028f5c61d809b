// A standby controller in its own process for benchmarks: as on a real pair of hosts, its
// commit work does not compete with the primary's event loop (only for the machine's 2 cores).

import { join } from 'node:path';
import { randomInt } from 'node:crypto';
import { RUBATO_COMMAND } from '../setup/index.ts';
import { spawnTracked, RubatoError } from '../util/index.ts';
import { writeKeyFile } from '../replication/index.ts';

export interface StandbyProcess {
  host: string;
  port: number;
  keyFile: string;
  pid: number;
  stop(): Promise<void>;
  /** Compare mode: its secondary VM runs (it said so on its event stream). */
  secondaryRunning(): boolean;
}

/** Starts `rubato standby`, in namespace `ns` listening on `host` when given (a shaped link), else on loopback. */
export async function startStandbyProcess(
  dir: string,
  tag: string,
  where?: { ns: string; host: string },
  durability: 'memory' | 'disk' = 'memory',
): Promise<StandbyProcess> {
  const keyFile = join(dir, `${tag}.psk`);
  writeKeyFile(keyFile, { force: true }); // the benchmark's own temp folder: a cell may repeat its tag
  let lastError = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = randomInt(20000, 60000);
    const host = where?.host ?? '127.0.0.1';
    // The benchmark measures replication, not fencing: one pair on one machine, no witness.
    const args = [
      'standby',
      '--no-witness',
      '--listen',
      `${host}:${port}`,
      '--state-dir',
      join(dir, `sb-${tag}`),
      '--key',
      keyFile,
      '--events',
      '--no-fsync',
      '--durability',
      durability,
      '--no-auto-failover',
      '--heartbeat-ms',
      '50',
    ];
    const bin = RUBATO_COMMAND;
    const p = where
      ? spawnTracked(`standby:${tag}`, 'ip', ['netns', 'exec', where.ns, bin, ...args], {
          env: { ...process.env, RUBATO_LOG: process.env['RUBATO_STANDBY_LOG'] ?? 'warn' },
        })
      : spawnTracked(`standby:${tag}`, bin, args, {
          env: { ...process.env, RUBATO_LOG: process.env['RUBATO_STANDBY_LOG'] ?? 'warn' },
        });
    let err = '';
    let listening = false;
    let secondaryRunning = false;
    p.child.stderr?.on('data', (d: Buffer) => {
      err = (err + d.toString()).slice(-2000);
      // Once it runs, its warnings and errors are the benchmark's too (why a session broke).
      if (listening) process.stderr.write(d.toString().replace(/^(?=.)/gm, `[standby ${tag}] `));
    });
    const ok = await new Promise<boolean>((resolve) => {
      let out = '';
      p.child.stdout?.on('data', (d: Buffer) => {
        out = (out + d.toString()).slice(-65536);
        if (out.includes('"listening"')) resolve(true);
        if (out.includes('"secondary-running"')) secondaryRunning = true;
      });
      void p.exited.then(() => resolve(false));
      setTimeout(() => resolve(false), 30_000);
    });
    listening = ok;
    if (ok)
      return {
        host,
        port,
        keyFile,
        pid: p.pid,
        stop: () => p.stop(3000),
        secondaryRunning: () => secondaryRunning,
      };
    const ended = await Promise.race([p.exited, new Promise<null>((r) => setTimeout(() => r(null), 0))]);
    await p.stop(1000);
    lastError = err.trim().split('\n').pop() ?? '';
    if (ended?.code === 2) break; // a configuration error: another port will not help
  }
  throw new RubatoError(
    'RUBATO_CONFIG',
    `could not start a standby process for the benchmark${lastError ? `: ${lastError}` : ''}`,
  );
}
