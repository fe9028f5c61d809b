// `rubato console VM`: the guest's serial console, from the controller that runs it on this host
// (`rubato protect`'s state folder, or the standby's after a failover). Raw terminal; Ctrl-]
// detaches and leaves the guest running.
import { connect, type Socket } from 'node:net';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { RubatoError } from '../../util/index.ts';
import { VmName } from '../../qemu/index.ts';

const DETACH = 0x1d; // Ctrl-]
const STANDBY_DIR = '/var/lib/rubato/standby';

export function register(program: Command): void {
  program
    .command('console')
    .description("attach to a VM's serial console on this host (detach: Ctrl-])")
    .argument('<vm>', 'the VM name')
    .option(
      '--state-dir <dir>',
      `the controller's state folder (default: /var/lib/rubato/VM, then ${STANDBY_DIR}, where a standby that took over runs it)`,
    )
    .action(async (vm: string, o: { stateDir?: string }) => runConsole(vm, o.stateDir));
}

/** Connects and asks for VM `name`; resolves with the socket once the controller said ok. */
function attach(path: string, name: string): Promise<Socket> {
  return new Promise((resolveP, reject) => {
    const s = connect(path);
    let head = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      head = Buffer.concat([head, d]);
      const nl = head.indexOf(10);
      if (nl < 0) {
        if (head.length > 512) reject(new RubatoError('RUBATO_PROTOCOL', `bad answer from ${path}`));
        return;
      }
      s.off('data', onData);
      s.off('error', onError);
      const line = head.subarray(0, nl).toString('utf8');
      if (line !== 'ok') {
        s.destroy();
        reject(new RubatoError('RUBATO_NOT_RUNNING', `${path}: ${line.replace(/^error: /, '')}`));
        return;
      }
      const rest = head.subarray(nl + 1);
      if (rest.length) process.stdout.write(rest);
      resolveP(s);
    };
    const onError = (e: Error) =>
      reject(new RubatoError('RUBATO_NOT_RUNNING', `no Rubato controller is running in ${path} (${e.message})`));
    s.on('data', onData);
    s.once('error', onError);
    s.write(`attach ${name}\n`);
  });
}

async function runConsole(vmArg: string, stateDir: string | undefined): Promise<void> {
  const name = VmName.safeParse(vmArg);
  if (!name.success) throw new RubatoError('RUBATO_CONFIG', `VM name ${JSON.stringify(vmArg)}: not a VM name`);
  const dirs = stateDir ? [resolve(stateDir)] : [join('/var/lib/rubato', name.data), STANDBY_DIR];
  let s: Socket | null = null;
  let lastError: unknown = null;
  for (const dir of dirs) {
    const path = join(dir, 'console.sock');
    if (!existsSync(path)) continue;
    try {
      s = await attach(path, name.data);
      break;
    } catch (e) {
      lastError = e;
    }
  }
  if (!s) {
    if (lastError) throw lastError;
    throw new RubatoError(
      'RUBATO_NOT_RUNNING',
      `VM ${name.data} does not run on this host (no console in ${dirs.join(' or ')}; --state-dir names another folder)`,
    );
  }
  const sock = s;
  process.stderr.write(`Connected to VM ${name.data}'s console (detach: Ctrl-])\r\n`);
  const tty = process.stdin.isTTY;
  if (tty) process.stdin.setRawMode(true);
  await new Promise<void>((done) => {
    const finish = () => {
      if (tty) process.stdin.setRawMode(false);
      process.stdin.pause();
      sock.destroy();
      done();
    };
    process.stdin.on('data', (d: Buffer) => {
      const at = d.indexOf(DETACH);
      if (at >= 0) {
        if (at > 0) sock.write(d.subarray(0, at));
        process.stderr.write('\r\n[detached]\r\n');
        finish();
        return;
      }
      sock.write(d);
    });
    process.stdin.on('end', finish);
    sock.on('data', (d: Buffer) => process.stdout.write(d));
    sock.on('close', finish);
    sock.on('error', finish);
  });
}
