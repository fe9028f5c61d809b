// The witness (etcd): ownership leases and fencing generations, the guard of a live guest, and the
// cluster's hosts, VMs and placement.

export { KEYS, LeasedKeys, publishStatus, readCluster, standbyLookup, vmRows } from './cluster.ts';
export type { ClusterView } from './cluster.ts';
export { EtcdClient } from './etcd.ts';
export { afterReclaim, guardOwnership } from './guard.ts';
export type { OwnershipGuard, Reclaim } from './guard.ts';
export { LOSS_FRACTION, LeaseClock, takeoverWaitMs } from './lease.ts';
export type { Fencing } from './lease.ts';
export { LocalEtcd } from './local-etcd.ts';
export { Ownership, currentGeneration, currentOwner } from './ownership.ts';
export type { Loss } from './ownership.ts';
export { place } from './placement.ts';
export { witnessGate } from './witness-gate.ts';
export type { WitnessGate } from './witness-gate.ts';
