// CLI options, parsed at the boundary: each command declares its options to commander (strings,
// with defaults) and validates them with one zod schema; a mistake is one line naming the flag
// (exit 2), never a stack trace. Shared option groups and the platform lookup live here too.

import { z } from 'zod';
import { hostname } from 'node:os';
import type { Command } from 'commander';
import { RubatoError } from '../util/index.ts';
import { LOSS_FRACTION, type Fencing } from '../coord/index.ts';
import { ensureGuestImage, ensurePatchedQemu, ensureTapRelay, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice, type QemuBinary, type Accel } from '../qemu/index.ts';
import { parsePolicy } from '../scheduler/index.ts';

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

function custom<T>(check: (v: unknown) => T | string): z.ZodType<T> {
  return z.any().transform((v, ctx) => {
    const r = check(v);
    if (typeof r === 'string' && r.startsWith('!')) {
      ctx.addIssue({ code: 'custom', message: r.slice(1) });
      return z.NEVER;
    }
    return r as T;
  }) as unknown as z.ZodType<T>;
}

/** A whole number in [min, max]. */
export const int = (min: number, max: number) =>
  custom<number>((v) => {
    const n = typeof v === 'number' ? v : Number(v);
    return v !== '' && Number.isInteger(n) && n >= min && n <= max
      ? n
      : `!must be a whole number from ${min} to ${max} (got "${String(v)}")`;
  });

/** A number in [min, max]. */
export const num = (min: number, max: number) =>
  custom<number>((v) => {
    const n = typeof v === 'number' ? v : Number(v);
    return v !== '' && Number.isFinite(n) && n >= min && n <= max
      ? n
      : `!must be a number from ${min} to ${max} (got "${String(v)}")`;
  });

/** One of `choices`. */
export const oneOf = <T extends string>(choices: readonly T[]) =>
  custom<T>((v) =>
    (choices as readonly string[]).includes(String(v))
      ? (v as T)
      : `!must be one of ${choices.join(', ')} (got "${String(v)}")`,
  );

/** A checkpoint policy spec (checked by the scheduler's own parser). */
export const policy = () =>
  custom<string>((v) => {
    try {
      parsePolicy(String(v));
      return String(v);
    } catch (e) {
      return `!${(e as Error).message}`;
    }
  });

/** HOST:PORT (port 0: any free port, where `anyPort`). */
export const hostPort = (anyPort = false) =>
  custom<{ host: string; port: number }>((v) => {
    const m = String(v).match(/^(.+):(\d{1,5})$/);
    const port = m ? Number(m[2]) : NaN;
    if (!m || port < (anyPort ? 0 : 1) || port > 65535) return `!must be HOST:PORT (got "${String(v)}")`;
    return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
  });

/** A comma-separated list of whole numbers in [1, max]. */
export const intList = (max: number) =>
  custom<number[]>((v) => {
    const l = String(v)
      .split(',')
      .map((x) => Number(x));
    return l.every((n) => Number.isInteger(n) && n >= 1 && n <= max)
      ? l
      : `!must list whole numbers from 1 to ${max} (got "${String(v)}")`;
  });

/** Validates a command's options; the first problem becomes one line naming its flag. */
export function parseOptions<S extends z.ZodType>(schema: S, raw: unknown): z.infer<S> {
  const r = schema.safeParse(raw);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const flag = issue.path.length ? `--${kebab(String(issue.path[0]))}` : 'options';
  throw new RubatoError('RUBATO_CONFIG', `${flag}: ${issue.message}`);
}

export const ACCEL = oneOf(['auto', 'kvm', 'tcg'] as const);

/** The accelerator choice shared by every command that boots a guest. */
export function withAccel(c: Command): Command {
  return c.option('--accel <accel>', 'auto, kvm or tcg', 'auto');
}

/** Failure-detection options shared by the commands that run a replication link. */
export function withLinkOptions(c: Command): Command {
  return c
    .option('--heartbeat-ms <ms>', 'heartbeat interval', '100')
    .option('--timeout-ms <ms>', 'peer declared lost after this silence', '1000')
    .option('--hold-ms <ms>', 'with no standby for this long, held output leaves unprotected', '2000');
}
export const LINK = { heartbeatMs: int(10, 60000), timeoutMs: int(50, 600000), holdMs: int(100, 600000) };

/** How held output is released: after its checkpoint's ack (buffer), or when a secondary VM sent the same (compare). */
export const MODE = { mode: z.enum(['buffer', 'compare', 'auto'], { message: 'must be buffer, compare or auto' }) };
export function withModeOption(c: Command): Command {
  return c.option(
    '--mode <mode>',
    'buffer: a reply leaves once its checkpoint is acknowledged; compare: once a secondary VM on the standby sent the same reply (COLO-style; a mismatch waits for the checkpoint); auto: compare, planning checkpoints as buffer mode while too few replies match',
    'buffer',
  );
}

/** The operator's endpoints (src/observe): Prometheus metrics and the live dashboard. */
export const OBSERVE = { metrics: hostPort(true).optional(), http: hostPort(true).optional() };
export function withObserveOptions(c: Command, dashboard = true): Command {
  c.option(
    '--metrics <host:port>',
    'serve Prometheus metrics at http://HOST:PORT/metrics (and the status at /status); port 0: any free port, printed',
  );
  if (dashboard)
    c.option(
      '--http <host:port>',
      'serve a live dashboard at http://HOST:PORT/ (metrics there too when --metrics names the same address)',
    );
  return c;
}

/** When a standby acknowledges a checkpoint (see docs/replication.md). */
export const DURABILITY = z.enum(['memory', 'disk'], { error: 'must be memory or disk' });
export function withDurabilityOption(c: Command, as = ''): Command {
  return c.option(
    '--durability <mode>',
    `${as}when a checkpoint is acknowledged: memory (complete in the standby's memory, written to the replica behind the ack; Remus' choice) or disk (at its commit point in the replica's files)`,
    'memory',
  );
}

/** The witness (etcd) options of the commands that may run a guest live. */
export function withWitnessOptions(c: Command): Command {
  return c
    .option(
      '--etcd <urls>',
      'the witness: etcd client URLs (comma-separated; `rubato witness` runs one); no two live copies of a VM (see docs/witness.md)',
    )
    .option('--no-witness', 'run without a witness: a cut replication link can then run two copies of the VM')
    .option('--host <name>', "this host's name in the witness", hostname())
    .option(
      '--lease-ttl <s>',
      'witness lease TTL, seconds: a host cut off from etcd holds all output within 2/3 of it; a crashed primary is replaced after it (etcd must grant it: its minimum is 1.5 election timeouts)',
      '1',
    );
}
export const WITNESS = {
  etcd: custom<string[]>((v) => {
    const urls = String(v)
      .split(',')
      .map((u) => u.trim())
      .filter(Boolean);
    return urls.length && urls.every((u) => /^https?:\/\/[^/\s]+$/.test(u))
      ? urls
      : '!must be etcd client URLs like http://10.0.0.5:2379 (comma-separated)';
  }).optional(),
  host: z.string().regex(/^[a-zA-Z0-9_.-]{1,63}$/, 'must be a host name'),
  leaseTtl: int(1, 60),
  witness: z.boolean().default(true),
};

/**
 * Safe by default: a command that may run a guest live needs a witness unless `--no-witness` says
 * otherwise, and its timers must keep a host cut off from everything from letting held output out
 * unprotected before it gives the VM up. Each mistake is one line.
 */
export function fencingOf(o: {
  etcd?: string[] | undefined;
  witness: boolean;
  leaseTtl: number;
  holdMs: number;
  heartbeatMs: number;
  timeoutMs: number;
}): Fencing {
  if (o.heartbeatMs >= o.timeoutMs)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `--heartbeat-ms ${o.heartbeatMs} must be shorter than --timeout-ms ${o.timeoutMs}`,
    );
  if (o.etcd && !o.witness)
    throw new RubatoError('RUBATO_CONFIG', '--etcd and --no-witness contradict each other: give one');
  if (!o.etcd) {
    if (o.witness)
      throw new RubatoError(
        'RUBATO_CONFIG',
        'no witness: give --etcd URL,... (`rubato witness` runs one on a third machine), or --no-witness to accept that a cut link can run two copies',
      );
    return 'none';
  }
  const lossMs = Math.ceil(o.leaseTtl * 1000 * LOSS_FRACTION);
  if (lossMs >= o.holdMs) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `--lease-ttl ${o.leaseTtl} s gives the VM up ${lossMs} ms after the last renewal, not before --hold-ms ${o.holdMs} lets held output out unprotected: raise --hold-ms above ${lossMs} or lower --lease-ttl`,
    );
  }
  return 'witness';
}

/** Said once at start when there is no witness (and shown by status and the metrics as fencing "none"). */
export const NO_WITNESS_WARNING =
  'NO WITNESS (--no-witness): a cut replication link with both hosts alive runs two copies of the guest';

/** The guest image, accelerator and QEMU a command that boots the test guest needs. */
export async function platform(
  accelChoice: AccelChoice,
): Promise<{ accel: Accel; binary: QemuBinary; guest: { kernel: string; initrd: string }; tapRelay: string }> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), guest);
  return { accel, binary: await binaryFor(accel), guest, tapRelay: await ensureTapRelay() };
}

/** The QEMU for an accelerator (the standby resolves it when a primary connects). */
export async function binaryFor(accel: Accel): Promise<QemuBinary> {
  return accel === 'tcg' ? ensurePatchedQemu() : stockQemu();
}

/** One JSON object per event on stdout, when enabled. */
export function eventPrinter(enabled: boolean): (e: object) => void {
  return (e) => {
    if (enabled) process.stdout.write(`${JSON.stringify({ t: Date.now(), ...e })}\n`);
  };
}

/** The one status line a protecting controller logs for people (without --events). */
export function statusLine(
  policy: string,
  e: {
    epoch: number;
    ackedEpoch: number;
    ckptPerSec: number;
    dirtyPages: number;
    pauseMs: number;
    mbPerSec: number;
    lagMs: number;
  },
): string {
  return `${policy} | epoch ${e.epoch} acked ${e.ackedEpoch} | ${e.ckptPerSec} ckpt/s | ${e.dirtyPages} dirty pages | pause ${e.pauseMs} ms | ${e.mbPerSec} MB/s | lag ${e.lagMs} ms`;
}
