// `rubato bench`: replicated against unreplicated, side by side, with machine-readable results.

export { runCaptureCheck } from './capture-check.ts';
export { runCaptureBench } from './capture.ts';
export { runEvaluation } from './evaluate.ts';
export { runFailoverBench } from './failover.ts';
export { runKvBench } from './kv.ts';
export { runNbdBench } from './nbd.ts';
export { runProfile } from './profile.ts';
export { SCHEDULER_WORKLOADS, runSchedulerBench } from './scheduler.ts';
export { PROBES, SERVICE_POLICIES, runServicesBench } from './services.ts';
export { revalidate } from './validate.ts';
