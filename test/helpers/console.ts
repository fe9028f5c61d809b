// An operator at a terminal: `rubato console VM` run inside tmux (a private tmux server, ended by
// its PID), keys sent, the screen read back.
import { runCommand } from '../../src/util/procs.ts';
import { sleep } from '../../src/util/async.ts';
import { RUBATO_BIN } from './rubato.ts';

let n = 0;

export interface ConsoleSeen {
  /** The screen when the login prompt was seen. */
  screen: string;
  /** Ctrl-] ended `rubato console` (the guest left running). */
  detached: boolean;
}

/** Attaches to VM `vm`'s console in `ns` (a test host) and waits for the guest's login prompt. */
export async function consoleLoginPrompt(
  ns: string,
  stateDir: string,
  vm: string,
  timeoutMs = 60_000,
): Promise<ConsoleSeen> {
  const server = `rubato-test-${process.pid}-${n++}`;
  const tmux = (args: string[]) => runCommand('tmux', ['-L', server, ...args]);
  const cmd = ['ip', 'netns', 'exec', ns, RUBATO_BIN, 'console', vm, '--state-dir', stateDir].join(' ');
  const made = await tmux(['new-session', '-d', '-s', 'op', '-x', '150', '-y', '40', cmd]);
  if (made.code !== 0) throw new Error(`tmux: ${made.stderr.trim()}`);
  const pid = Number((await tmux(['display-message', '-p', '#{pid}'])).stdout.trim());
  try {
    const screen = async () => (await tmux(['capture-pane', '-p', '-t', 'op'])).stdout;
    const until = Date.now() + timeoutMs;
    let seen = '';
    while (Date.now() < until) {
      await tmux(['send-keys', '-t', 'op', 'Enter']);
      await sleep(1500);
      seen = await screen();
      if (/login:/.test(seen)) break;
    }
    if (!/login:/.test(seen)) throw new Error(`no login prompt on VM ${vm}'s console; the screen:\n${seen}`);
    await tmux(['send-keys', '-t', 'op', 'C-]']);
    let detached = false;
    for (let i = 0; i < 50 && !detached; i++) {
      await sleep(100);
      detached = (await tmux(['has-session', '-t', 'op'])).code !== 0;
    }
    return { screen: seen, detached };
  } finally {
    if (pid > 0)
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        /* gone with its last session */
      }
  }
}
