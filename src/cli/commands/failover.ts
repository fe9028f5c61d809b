// `rubato failover`, `rubato switchover` and `rubato status`: commands to a controller's control
// socket in its state folder (a standby's, or `rubato protect`'s).
import type { Command } from 'commander';
import { controlCommand } from '../../replication/index.ts';
import { isRubatoError, RubatoError, sleep } from '../../util/index.ts';

const STANDBY_DIR = '/var/lib/rubato/standby';
/** How long `rubato stop` waits for the controller (its --stop-timeout is 30 s by default). */
const STOP_WAIT_MS = 3_600_000;

export function register(program: Command): void {
  const action = (cmd: 'failover' | 'switchover') => async (o: { stateDir: string }) => {
    const r = await controlCommand(o.stateDir, cmd);
    process.stdout.write(`${JSON.stringify(r)}\n`);
    if (r['ok'] !== true) process.exitCode = 1;
  };
  program
    .command('failover')
    .description(
      'make the standby take over now: a primary on a live link first stops its guest and confirms; if the link drops before it confirms, the standby takes over only as for a lost primary (through the witness)',
    )
    .option('--state-dir <dir>', "the standby's state folder", STANDBY_DIR)
    .action(action('failover'));

  program
    .command('stop')
    .description(
      "stop a VM on this host in order: protection ends (its standby keeps the replica and does not take over), the guest shuts down through ACPI (powered off after the controller's --stop-timeout), the controller exits",
    )
    .argument('<vm>', 'the VM name')
    .option('--state-dir <dir>', `the controller's state folder (default: /var/lib/rubato/VM, then ${STANDBY_DIR})`)
    .action(async (vm: string, o: { stateDir?: string }) => stopVm(vm, o.stateDir));

  program
    .command('release')
    .description(
      'hand an adopted VM (rubato protect --adopt) back to a QEMU of its own, live, started with the command line it came with; protection ends, the controller exits',
    )
    .argument('<vm>', 'the VM name')
    .option('--state-dir <dir>', "the controller's state folder (default: /var/lib/rubato/VM)")
    .action(async (vm: string, o: { stateDir?: string }) => {
      const dir = await controllerOf(vm, o.stateDir ? [o.stateDir] : [`/var/lib/rubato/${vm}`]);
      const r = await controlCommand(dir, 'release');
      if (r['ok'] !== true)
        throw new RubatoError('RUBATO_MIGRATION', `VM ${vm}: ${String(r['error'] ?? 'the release failed')}`);
      process.stdout.write(`${JSON.stringify(r)}\n`);
    });

  program
    .command('switchover')
    .description(
      'planned maintenance: move the VM to its standby with no lost output (the primary takes a last checkpoint with its guest stopped, then the standby runs it)',
    )
    .option('--state-dir <dir>', "the standby's state folder", STANDBY_DIR)
    .action(action('switchover'));

  program
    .command('status')
    .description(
      "a controller's view: role, protected or not and why, epochs, lag, checkpoints/s, pauses, held output, last failover",
    )
    .option('--state-dir <dir>', "the controller's state folder (rubato protect: /var/lib/rubato/VM-NAME)", STANDBY_DIR)
    .option('--json', 'one JSON object', false)
    .action(async (o: { stateDir: string; json: boolean }) => {
      let r: Record<string, unknown>;
      try {
        r = { running: true, ...(await controlCommand(o.stateDir, 'status')) };
      } catch (e) {
        // A dead controller is an answer, not a mistake: said as such, with its own exit code (9).
        if (o.json && isRubatoError(e, 'RUBATO_NOT_RUNNING'))
          process.stdout.write(`${JSON.stringify({ running: false, stateDir: e.context['stateDir'] })}\n`);
        throw e;
      }
      if (o.json) {
        process.stdout.write(`${JSON.stringify(r)}\n`);
        return;
      }
      process.stdout.write(formatStatus(r));
    });
}

const LABELS: Array<[string, string]> = [
  ['role', 'role'],
  ['vm', 'VM'],
  ['state', 'state'],
  ['protected', 'protected'],
  ['unprotectedReason', 'why not'],
  ['standby', 'standby'],
  ['primary', 'primary'],
  ['epoch', 'epoch'],
  ['ackedEpoch', 'acknowledged epoch'],
  ['replicaEpoch', 'replica epoch'],
  ['lagMs', 'lag (ms)'],
  ['ckptPerSec', 'checkpoints/s'],
  ['pauseMsP50', 'pause p50 (ms)'],
  ['pauseMsP99', 'pause p99 (ms)'],
  ['heldFrames', 'output held (frames)'],
  ['heldBytes', 'output held (bytes)'],
  ['oldestHeldMs', 'oldest held (ms)'],
  ['lastFailover', 'last failover'],
];

/** A two-column table of the fields a controller reported (absent ones left out). */
export function formatStatus(r: Record<string, unknown>): string {
  const rows = LABELS.filter(([k]) => k in r && r[k] !== undefined).map(([k, label]) => {
    const v = r[k];
    const text =
      v === null
        ? '-'
        : typeof v === 'object'
          ? Object.entries(v as object)
              .map(([a, b]) => `${a} ${String(b)}`)
              .join(', ')
          : String(v);
    return [label, text] as const;
  });
  const w = Math.max(...rows.map(([l]) => l.length));
  return rows.map(([l, t]) => `${l.padEnd(w)}  ${t}\n`).join('');
}

/** The state folder (of `dirs`) whose controller runs VM `vm` here. */
async function controllerOf(vm: string, dirs: string[]): Promise<string> {
  for (const d of dirs) {
    const st = await controlCommand(d, 'status').catch(() => null);
    if (st && st['vm'] === vm) return d;
  }
  throw new RubatoError(
    'RUBATO_NOT_RUNNING',
    `no controller runs VM ${vm} on this host (looked in ${dirs.join(', ')})`,
  );
}

/** Finds the controller that runs VM `vm` here, asks it to stop, and waits until it has. */
async function stopVm(vm: string, stateDir: string | undefined): Promise<void> {
  const dir = await controllerOf(vm, stateDir ? [stateDir] : [`/var/lib/rubato/${vm}`, STANDBY_DIR]);
  await controlCommand(dir, 'stop');
  const t0 = Date.now();
  let said = t0;
  for (;;) {
    await sleep(250);
    if ((await controlCommand(dir, 'status').catch(() => null)) === null) break;
    if (Date.now() - said >= 5000) {
      said = Date.now();
      process.stderr.write(`rubato: VM ${vm}: shutting down (${Math.round((Date.now() - t0) / 1000)} s)\n`);
    }
    if (Date.now() - t0 > STOP_WAIT_MS)
      throw new RubatoError(
        'RUBATO_TIMEOUT',
        `VM ${vm}: its controller in ${dir} did not end within ${STOP_WAIT_MS / 1000} s`,
      );
  }
  process.stdout.write(`${JSON.stringify({ ok: true, vm, stateDir: dir, ms: Date.now() - t0 })}\n`);
}
