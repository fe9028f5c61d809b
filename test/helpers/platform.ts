// What the integration tests share: the guest image, the accelerator (auto: TCG here, with the
// patched QEMU) and the QEMU binary to use, resolved once per test file.
import { ensureGuestImage, ensurePatchedQemu, stockQemu } from '../../src/setup/setup.ts';
import { resolveAccel } from '../../src/qemu/accel.ts';
import type { QemuBinary } from '../../src/qemu/vm.ts';
import type { Accel } from '../../src/qemu/spec.ts';

export interface TestPlatform {
  accel: Accel;
  binary: QemuBinary;
  guest: { kernel: string; initrd: string };
}

export async function testPlatform(): Promise<TestPlatform> {
  const guest = await ensureGuestImage();
  const accel = (
    await resolveAccel(
      (process.env['RUBATO_TEST_ACCEL'] as 'auto' | 'kvm' | 'tcg' | undefined) ?? 'auto',
      stockQemu(),
      guest,
    )
  ).accel;
  return { accel, binary: accel === 'tcg' ? await ensurePatchedQemu() : stockQemu(), guest };
}
