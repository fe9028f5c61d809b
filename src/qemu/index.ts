// QEMU itself: a VM's spec and its definition file, starting and ending QEMU, QMP, the accelerator,
// the migration stream's format and restoring a replica.

export { resolveAccel } from './accel.ts';
export type { AccelChoice } from './accel.ts';
export { VmDefinitionSchema, loadVmDefinition, parseVmDefinition } from './definition.ts';
export type { ResolvedVm, VmDefinition } from './definition.ts';
export { MAX_DOMAIN_XML_BYTES, networkBridgeOf, parseDomainXml, VIRSH_TIMEOUT_MS } from './libvirt.ts';
export type { ImportResult } from './libvirt.ts';
export { QmpClient } from './qmp.ts';
export type { QmpEvent } from './qmp.ts';
export { restoreVm, startRestore, loadAndRun, type StartedRestore } from './restore.ts';
export {
  DIRTIER_LINE_RE,
  MAIN_RAM_ID,
  VmName,
  VmSpecSchema,
  diskBuses,
  type DiskBus,
  nicsOf,
  guestAppend,
  qemuArgs,
  parseDirtierLine,
} from './spec.ts';
export type { Accel, SpecNic, VmSpec } from './spec.ts';
export {
  COLO_MSG,
  COLO_MSG_NAMES,
  COLO_PRESEND_DELAY_MAGIC,
  COLO_PRESEND_MARK,
  MIG_CMD,
  MIG_CMD_NAMES,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  RAM_FLAG,
  RAM_SECTION_VERSION,
  TARGET_PAGE_SIZE,
  VM,
  coloMessage,
} from './stream-format.ts';
export { ColoSecondary } from './secondary.ts';
export { ConsoleServer } from './console.ts';
export { DEFAULT_STOP_TIMEOUT_MS, QemuVm } from './vm.ts';
export type { QemuBinary } from './vm.ts';
