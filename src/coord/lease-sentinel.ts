// What survives a controller's death on its host and gives the VM up at once: a small process
// (plain JS, one per ownership) that holds the lease's id and the PIDs of the guest processes tied to
// it, told over a pipe. The controller never closes that pipe while it lives; when it dies in any
// way (SIGKILL, a crash, the OOM killer) the kernel closes it. The sentinel then waits until every
// tied process is gone too (QEMU dies with its controller: PR_SET_PDEATHSIG), and revokes the lease:
// the owner key vanishes, and the standby (watching it, witness-gate.ts) claims the VM at once
// instead of waiting its liveness timeout and the unrenewed-claim wait. A tied process that lives
// on (a QEMU meant to outlive its controller) keeps the lease: then the standby takes over as after
// a host crash. An orderly release says goodbye first and the sentinel exits without a revoke.
//
// Safe by construction: it revokes only once nothing on this host can run the guest or release its
// output (the controller holds the release gate; QEMU is gone), which is what the lease stands for.

import { type TrackedProcess, disown, errorMessage, logger, spawnTracked } from '../util/index.ts';

const log = logger('witness');

/** How long tied processes may take to die after their controller (PR_SET_PDEATHSIG is immediate). */
const TIED_GONE_WITHIN_MS = 1000;
/** One revoke request's deadline, per endpoint. */
const REVOKE_TIMEOUT_MS = 500;

const SENTINEL_SOURCE = `
const TIED_GONE_WITHIN_MS = ${TIED_GONE_WITHIN_MS};
const REVOKE_TIMEOUT_MS = ${REVOKE_TIMEOUT_MS};
try { require('node:os').setPriority(-10); } catch (e) { /* not root */ }
let endpoints = [];
let lease = null;
const tied = new Set();
let bye = false;
let buf = '';
// Gone: no such process, a zombie (dead; its new parent reaps it late), or exiting (PF_EXITING,
// set as do_exit begins: it never runs its own code again, though freeing a big guest's memory
// takes the kernel a while).
const PF_EXITING = 0x4;
const alive = (pid) => {
  let stat;
  try { stat = require('node:fs').readFileSync('/proc/' + pid + '/stat', 'latin1'); }
  catch (e) { return false; }
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return f[0] !== 'Z' && f[0] !== 'X' && (Number(f[6]) & PF_EXITING) === 0;
};
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  buf += d;
  let nl;
  while ((nl = buf.indexOf('\\n')) >= 0) {
    const line = buf.slice(0, nl);
    buf = buf.slice(nl + 1);
    let m;
    try { m = JSON.parse(line); } catch (e) { continue; }
    if (Array.isArray(m.endpoints)) endpoints = m.endpoints.filter((e) => typeof e === 'string');
    if ('lease' in m) lease = typeof m.lease === 'string' && /^[0-9]{1,20}$/.test(m.lease) ? m.lease : null;
    if (Number.isInteger(m.tie) && m.tie > 1) tied.add(m.tie);
    if (Number.isInteger(m.untie)) tied.delete(m.untie);
    if (m.bye === true) { bye = true; process.exit(0); }
  }
});
process.stdin.on('end', async () => {
  if (bye || lease === null) process.exit(0);
  const until = Date.now() + TIED_GONE_WITHIN_MS;
  while ([...tied].some(alive)) {
    if (Date.now() > until) {
      process.stderr.write('lease sentinel: a guest process outlived its controller; the lease is left to expire\\n');
      process.exit(3);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  for (const ep of endpoints) {
    try {
      const r = await fetch(ep + '/v3/lease/revoke', {
        method: 'POST', body: JSON.stringify({ ID: lease }), signal: AbortSignal.timeout(REVOKE_TIMEOUT_MS),
      });
      if (r.ok || r.status === 404) process.exit(0);
    } catch (e) { /* the next endpoint */ }
  }
  process.exit(4);
});
`;

/** The controller's side of a lease sentinel: started once, told every lease and tied PID, said goodbye to. */
export class LeaseSentinel {
  private readonly proc: TrackedProcess | null;

  constructor(endpoints: readonly string[]) {
    let p: TrackedProcess | null = null;
    try {
      // outlive: no death signal tied to ours (it must act after we die), its own session; disowned
      // at once: it ends itself when our end of the pipe closes.
      p = spawnTracked('lease-sentinel', process.execPath, ['-e', SENTINEL_SOURCE], {
        outlive: true,
        stdio: ['pipe', 'ignore', 'ignore'],
      });
      disown(p);
      p.child.stdin?.on('error', (e) => log.debug(`lease sentinel: ${errorMessage(e)}`));
      // (the pipe must not keep this process alive)
      (p.child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    } catch (e) {
      log.warn(`no lease sentinel (a dead controller's lease then expires on its own): ${errorMessage(e)}`);
      p = null;
    }
    this.proc = p;
    this.send({ endpoints });
  }

  /** The lease to revoke if this process dies (null: none). */
  lease(id: string | null): void {
    this.send({ lease: id });
  }

  /** A guest process that must be gone before the lease is given up (else it is left to expire). */
  tie(pid: number): void {
    this.send({ tie: pid });
  }

  /** An orderly end: the sentinel exits without revoking (the caller released the lease itself). */
  close(): void {
    this.send({ bye: true });
    this.proc?.child.stdin?.end();
  }

  private send(m: object): void {
    const s = this.proc?.child.stdin;
    if (s && !s.destroyed && s.writable) s.write(`${JSON.stringify(m)}\n`);
  }
}
