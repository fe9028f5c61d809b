// Progress of a synchronisation (the full image going to a standby), as both sides report it.
// Pure: the rate is unknown until some bytes moved, and so is the time left (never a division by zero).

export type SyncProgress = {
  event: 'sync-progress';
  bytes: number;
  totalBytes: number;
  percent: number;
  mbPerSec: number;
  /** Seconds left at the rate so far; null until a rate is known. */
  etaSec: number | null;
};

/** The progress after `bytes` of `totalBytes` in `elapsedMs`. */
export function syncProgress(bytes: number, totalBytes: number, elapsedMs: number): SyncProgress {
  const rate = elapsedMs > 0 ? bytes / (elapsedMs / 1000) : 0;
  const left = Math.max(0, totalBytes - bytes);
  return {
    event: 'sync-progress',
    bytes,
    totalBytes,
    percent: Math.min(100, Math.round((bytes / Math.max(1, totalBytes)) * 1000) / 10),
    mbPerSec: Math.round(rate / 1e5) / 10,
    etaSec: bytes > 0 && rate >= 1 ? Math.round((left / rate) * 10) / 10 : null,
  };
}

/** "12.5 % (100 of 800 MB, 45.1 MB/s, 15.5 s left)"; "starting" while nothing has moved. */
export function formatProgress(p: Omit<SyncProgress, 'event'>): string {
  const mb = (b: number) => Math.round(b / 1e6);
  const speed = p.etaSec === null ? 'starting' : `${p.mbPerSec} MB/s, ${p.etaSec} s left`;
  return `${p.percent} % (${mb(p.bytes)} of ${mb(p.totalBytes)} MB, ${speed})`;
}
