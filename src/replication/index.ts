// The pair: the primary controller and its epoch pipeline, the standby and its replica store, and
// the authenticated link and protocol between them.

export type { ActivationGate } from './activation.ts';
export { ControlSocket, controlCommand } from './control-socket.ts';
export type { ControlHandlers } from './control-socket.ts';
export { dispatch } from './driver.ts';
export type { OutsideHandlers } from './driver.ts';
export { loadKeyFile, writeKeyFile } from './keyfile.ts';
export { LatencyBreakdown, SEGMENTS, formatBreakdown } from './latency.ts';
export type { Breakdown } from './latency.ts';
export type { CheckpointObserver } from './observer.ts';
export { EpochPipeline } from './pipeline.ts';
export { DISK_BLOCK_ID, PrimaryController } from './primary.ts';
export type { PrimaryEvent, PrimaryOptions, ReleaseMode } from './primary.ts';
export type { Identity } from './protocol/messages.ts';
export { syncProgress, formatProgress } from './progress.ts';
export type { SyncProgress } from './progress.ts';
export { ReplicaStore } from './replica-store.ts';
export type { Durability } from './replica-store.ts';
export { acceptsPrimary, nextStandbyState } from './standby-state.ts';
export type { StandbyInput, StandbyState } from './standby-state.ts';
export { StandbyController } from './standby.ts';
export type { StandbyEvent, StandbyOptions } from './standby.ts';
