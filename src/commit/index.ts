// Output commit: a guest's frames held until the standby acknowledged the checkpoint that covers
// them, and the release gate every frame passes on its way out.

export { OutputCommit } from './output-commit.ts';
export type {
  ClosedEpoch,
  DiskEpochCut,
  DiskEpochSource,
  DiskEpochWrites,
  OutputStats,
  Sized,
} from './output-commit.ts';
export { ReleaseGate } from './release-gate.ts';
export type { LeaseCheck } from './release-gate.ts';
export { FrameComparator, frameIdentity } from './compare.ts';
export type { CompareCounts, FrameIdentity, MismatchKind } from './compare.ts';
export { ModeChooser, DEFAULT_MODE_CHOOSER } from './mode-chooser.ts';
export type { ModeChange, ModeChooserOptions, Planning } from './mode-chooser.ts';
