// Accelerator choice: kvm, tcg, or auto. `auto` probes /dev/kvm by booting the guest kernel under
// KVM once per host boot (cached): on hosts whose /dev/kvm cannot run a Linux guest (a nested
// software hypervisor, as on these machines) it falls back to TCG with one clear line saying why.

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
      await vm.waitSerial(/RUBATO boot ok/, 20_000);
      result = { ok: true, reason: 'the guest booted under KVM' };
    } catch {
      const why = vm.stderrTail.trim().split('\n').filter(Boolean).slice(-1)[0] ?? 'no boot within 20 s';
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
