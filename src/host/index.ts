// One host protecting a VM: claim it in the witness, prepare its disk and I/O, boot it, protect it.

export { claimBeforeStart, heldGeneration, recordGeneration } from './claim.ts';
export { protectVm, checkHostFor, checkAdoptable, restoreIo, specOf } from './protect.ts';
export { releaseVm } from './release.ts';
export type { ProtectOptions, ProtectedVm } from './protect.ts';
export type { Released } from './release.ts';
export { migrateLocal } from './local-migration.ts';
export type { LocalMigration } from './local-migration.ts';
export {
  forgetAdopted,
  incomingArgv,
  ownQemuArgs,
  ownTapName,
  qmpPathOf,
  readAdopted,
  recordAdopted,
  tapsOf,
} from './own-qemu.ts';
export type { AdoptedRecord } from './own-qemu.ts';
export { startPrimarySide } from './primary-side.ts';
export { standbySide } from './standby-side.ts';
export type { RestoredIo, StandbySideOptions } from './standby-side.ts';
export { readActive, recordActive, retireActive, definitionOf, activeFile, vmDir } from './resume.ts';
export type { ActiveRecord } from './resume.ts';
export type { PrimarySide, PrimarySideOptions } from './primary-side.ts';
