// Small helpers any folder may use: logging, typed errors, tracked processes, private files, the
// monotonic clock, byte reading. The ground floor: it imports no other folder.

export { LineSplitter, Wakeup, onceWithin, sleep, waitFor, withTimeout } from './async.ts';
export { ByteReader } from './byte-reader.ts';
export { monotonicMs } from './clock.ts';
export { EXIT_CODES, PERMANENT_EXIT_CODES, RubatoError, assert, errorMessage, isRubatoError } from './errors.ts';
export { GarbageMeter, collectNow } from './gc.ts';
export { HostIdleMeter } from './host-idle.ts';
export { LOG_FORMATS, LOG_LEVELS, jsonLine, logger } from './log.ts';
export { ensurePrivateDir, fsyncDir, openPrivate, writePrivate, writePrivateAtomic } from './private-files.ts';
export { disown, extendShutdownGrace, onShutdown, processWithFd, runCommand, spawnTracked } from './procs.ts';
export type { TrackedProcess } from './procs.ts';
export { procStatFields } from './proc-stat.ts';
export { fitLine, median, percentile, round } from './stats.ts';
export { makeTempDir, removeTempDir } from './tmp.ts';
