// Checkpoints out of QEMU: the COLO stream (route A) or migration (route B), parsed into dirty
// pages and device state, with the pause measured.

export { MAX_DEVICE_STATE_BYTES, PAGE_SIZE, PageSet } from './checkpoint.ts';
export type { BaseImage, Checkpoint, DirtyPage, RamBlockInfo } from './checkpoint.ts';
export { PauseMeter } from './pause-meter.ts';
export { ColoCapture } from './route-a.ts';
export { ExternalCapture } from './route-b.ts';
export { checkDeviceState } from './stream/parser.ts';
export type { PageSink } from './stream/parser.ts';
export { diffPages, readRamFile } from './verify.ts';
