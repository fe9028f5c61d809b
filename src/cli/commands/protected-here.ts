// A VM this controller runs and protects on its own host. `rubato protect` and a standby that
// brings its VM back after a takeover share this wiring around protectVm: the witness generation
// recorded as the guard sees it, a lost ownership stopping the guest, the control and console
// sockets in the state folder.
import { join } from 'node:path';
import { ConsoleServer, type QemuVm } from '../../qemu/index.ts';
import { ControlSocket, type ControlHandlers } from '../../replication/index.ts';
import { protectVm, recordGeneration, type ProtectOptions, type ProtectedVm } from '../../host/index.ts';

export interface HereOptions extends Omit<ProtectOptions, 'onGuardEvent' | 'stopGuest'> {
  emit: (e: Record<string, unknown>) => void;
  /** The VM's ownership was lost: said here, then its guest is stopped (no second copy can run). */
  onOwnershipLost: (why: string) => void;
}

/** Boots (or adopts) the VM here under protection; the generation it holds goes to its state folder. */
export function protectHere(o: HereOptions): Promise<ProtectedVm> {
  const { emit, onOwnershipLost, ...rest } = o;
  return protectVm({
    ...rest,
    onGuardEvent: (e) => {
      emit(e);
      if (e['event'] === 'owner' && typeof e['generation'] === 'number')
        void recordGeneration(o.stateDir, e['generation']);
    },
    stopGuest: (why, primary) => {
      onOwnershipLost(why);
      void primary.crash();
    },
  });
}

/** The controller's control socket (status, stop, …) and the guest's console, in `dir`. */
export async function openEndpoints(
  dir: string,
  handlers: ControlHandlers,
  vm: () => QemuVm | null,
): Promise<{ close(): void }> {
  const control = new ControlSocket(join(dir, 'control.sock'), handlers);
  await control.start();
  const console_ = new ConsoleServer(join(dir, 'console.sock'), vm);
  await console_.start();
  return {
    close: () => {
      control.close();
      console_.close();
    },
  };
}
