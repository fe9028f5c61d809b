// The process's monotonic clock for safety timing (leases, fencing): never the wall clock, which
// steps. The same in every thread of the process (CLOCK_MONOTONIC), so a worker's readings compare.

/** Monotonic time in ms. */
export const monotonicMs = (): number => Number(process.hrtime.bigint()) / 1e6;
