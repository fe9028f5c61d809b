// `rubato failover`, `rubato switchover` and `rubato status`: commands to a controller's control
// socket in its state folder (a standby's, or `rubato protect`'s).
import type { Command } from 'commander';
import { controlCommand } from '../../replication/index.ts';
import { isRubatoError } from '../../util/index.ts';

const STANDBY_DIR = '/var/lib/rubato/standby';

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
