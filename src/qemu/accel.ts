// Accelerator choice: kvm, tcg, or auto. `auto` probes /dev/kvm by booting the guest kernel under
// KVM once per host boot (cached in /run/rubato): on hosts whose /dev/kvm cannot run a Linux guest
// (a nested software hypervisor, as on these machines) it falls back to TCG with one clear line
// saying why. The probe ends at KVM's first internal error (a fraction of a second), bounded by
// 8 s, so the first VM on a freshly booted host never waits long for it.

import { accessSync, constants, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, logger, RubatoError } from '../util/index.ts';
import { QemuVm, type QemuBinary } from './vm.ts';
import { guestAppend, type Accel } from './spec.ts';

const log = logger('accel');
export type AccelChoice = Accel | 'auto';

export interface AccelDecision {
  accel: Accel;
  reason: string;
}

function bootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/** A real KVM boots the probe's kernel to its first line in well under a second. */
const PROBE_BOOT_MS = 8_000;

class KvmFailure extends Error {}

/** Rejects as soon as QEMU reports that KVM failed the guest (QMP status or stderr); polls every 100 ms. */
export function watchKvmFailure(vm: Pick<QemuVm, 'status' | 'stderrTail'>): {
  promise: Promise<never>;
  stop: () => void;
} {
  let timer: NodeJS.Timeout | null = null;
  let stopped = false;
  const promise = new Promise<never>((_, reject) => {
    const poll = async () => {
      if (stopped) return;
      if (/emulation failure|KVM internal error|kvm run failed/i.test(vm.stderrTail)) {
        reject(new KvmFailure('KVM internal error'));
        return;
      }
      const st = await vm.status().catch(() => 'unknown');
      if (st === 'internal-error' || st === 'guest-panicked' || st === 'shutdown') {
        reject(new KvmFailure(`the probe VM stopped: ${st}`));
        return;
      }
      if (!stopped) timer = setTimeout(() => void poll(), 100);
    };
    timer = setTimeout(() => void poll(), 100);
  });
  promise.catch(() => {}); // (raced by the caller; a late rejection is not unhandled)
  return {
    promise,
    stop: () => {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
}

async function probeKvm(
  binary: QemuBinary,
  guest: { kernel: string; initrd: string },
): Promise<{ ok: boolean; reason: string }> {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { ok: false, reason: '/dev/kvm is missing or not accessible' };
  }
  const cacheDir = process.env['RUBATO_RUN_DIR'] ?? '/run/rubato';
  const cacheFile = join(cacheDir, 'kvm-probe.json');
  try {
    const c = JSON.parse(readFileSync(cacheFile, 'utf8')) as { bootId: string; ok: boolean; reason: string };
    if (c.bootId === bootId()) return c;
  } catch {
    /* no cache */
  }
  const dir = makeTempDir('rubato-kvmprobe-');
  let result: { ok: boolean; reason: string };
  try {
    const vm = await QemuVm.start(
      {
        name: 'kvm-probe',
        accel: 'kvm',
        cpus: 1,
        memMb: 64,
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: guestAppend([]),
      },
      { binary, runDir: dir },
    );
    try {
      // A KVM that cannot run the guest says so at once (QEMU stops the VM with an internal error
      // and prints "emulation failure"): that ends the probe, not the boot timeout.
      const failed = watchKvmFailure(vm);
      try {
        await Promise.race([vm.waitSerial(/RUBATO boot ok/, PROBE_BOOT_MS), failed.promise]);
      } finally {
        failed.stop();
      }
      result = { ok: true, reason: 'the guest booted under KVM' };
    } catch (e) {
      const why =
        vm.stderrTail.trim().split('\n').filter(Boolean).slice(-1)[0] ??
        (e instanceof KvmFailure ? e.message : `no boot within ${PROBE_BOOT_MS / 1000} s`);
      result = { ok: false, reason: `/dev/kvm exists but cannot run the guest (${why})` };
    } finally {
      await vm.stop();
    }
  } catch (e) {
    result = {
      ok: false,
      reason: `/dev/kvm exists but cannot run the guest (${e instanceof Error ? e.message.replace(/^QEMU for VM kvm-probe failed to start: /, '').slice(0, 200) : String(e)})`,
    };
  } finally {
    removeTempDir(dir);
  }
  try {
    if (!existsSync(cacheDir)) mkdirSync(cacheDir, { recursive: true });
    writeFileSync(cacheFile, JSON.stringify({ bootId: bootId(), ...result }));
  } catch {
    /* cache is an optimisation */
  }
  return result;
}

let warned = false;

export async function resolveAccel(
  choice: AccelChoice,
  stock: QemuBinary,
  guest: { kernel: string; initrd: string },
): Promise<AccelDecision> {
  if (choice === 'tcg') return { accel: 'tcg', reason: 'requested' };
  if (choice === 'kvm') {
    if (!existsSync('/dev/kvm'))
      throw new RubatoError(
        'RUBATO_ACCEL',
        'accelerator kvm requested but /dev/kvm does not exist; use --accel tcg or auto',
      );
    return { accel: 'kvm', reason: 'requested' };
  }
  const probe = await probeKvm(stock, guest);
  if (probe.ok) return { accel: 'kvm', reason: probe.reason };
  if (warned) return { accel: 'tcg', reason: probe.reason };
  warned = true;
  log.warn(`accelerator: falling back to TCG (software emulation): ${probe.reason}`);
  return { accel: 'tcg', reason: probe.reason };
}
