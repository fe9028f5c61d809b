// The workload-adaptive checkpoint scheduler: pure policies over telemetry (see types.ts).

export { fitDirtyCurve, fitPause, lastPassAfterMs, pausePagesWithPresend, presendEveryMs } from './estimate.ts';
export { comparing, fixed, parsePolicy } from './policies.ts';
export { PAGE_BYTES } from './types.ts';
export type { EpochRecord, Policy, Telemetry } from './types.ts';
