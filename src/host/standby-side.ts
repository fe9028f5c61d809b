// The one way a standby is built: its controller, wired to the witness's activation gate (a lost
// primary is taken over only once this host holds the VM) and to the restored guest's I/O, whose
// frames leave only under the lease this host claimed — the release gate is set here, whoever
// builds the I/O (`rubato standby`, `rubato protect --listen` after a switchover, the agents'
// standbys, the chaos harness and the benchmarks). So what chaos tests is the wiring users run.

import { StandbyController, type Identity, type ReplicaStore, type StandbyOptions } from '../replication/index.ts';
import { ReleaseGate } from '../commit/index.ts';
import type { WitnessGate } from '../coord/index.ts';
import type { GuestNet } from '../io/index.ts';

/** A promoted secondary's I/O, which the guest keeps. */
type ExistingIo = Parameters<NonNullable<StandbyOptions['prepareRestore']>>[2];

/** A restored guest's I/O on this host: its relay (null: no NIC), the sockets QEMU connects to, and its undoing. */
export interface RestoredIo {
  relay: GuestNet | null;
  netSockets: string[];
  nbdSockets: string[];
  /** Undoes it (set up for a failover that did not happen). */
  close: () => Promise<void>;
}

export interface StandbySideOptions
  extends Omit<StandbyOptions, 'gate' | 'prepareRestore' | 'host' | 'port' | 'psk' | 'stateDir'> {
  listen: { host: string; port: number };
  stateDir: string;
  psk: Buffer;
  /** The witness's activation gate; null only when the user refused one (--no-witness) or in benchmarks. */
  gate: WitnessGate | null;
  /**
   * Starts the restored guest's I/O on this host from the replica (at failover), or takes over a promoted
   * secondary's (`existing`).
   */
  restoreIo?: (identity: Identity, store: ReplicaStore, existing?: ExistingIo) => Promise<RestoredIo>;
}

/** Builds a standby controller with its gate and its restored guest's release gate (start() it). */
export function standbySide(o: StandbySideOptions): StandbyController {
  const { listen, gate, restoreIo, ...rest } = o;
  return new StandbyController({
    ...rest,
    host: listen.host,
    port: listen.port,
    ...(gate ? { gate } : {}),
    ...(restoreIo
      ? {
          prepareRestore: async (identity, store, existing) => {
            const io = await restoreIo(identity, store, existing);
            // The restored guest's frames leave only under the lease this side claimed before the restore.
            if (gate && io.relay) io.relay.gate = new ReleaseGate((now) => gate.ownership(identity.vm).leaseCheck(now));
            return { netSockets: io.netSockets, nbdSockets: io.nbdSockets, close: io.close };
          },
        }
      : {}),
  });
}
