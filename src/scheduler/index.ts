// The workload-adaptive checkpoint scheduler: pure policies over telemetry (see types.ts).
export * from './types.ts';
export * from './policies.ts';
export * from './estimate.ts';
