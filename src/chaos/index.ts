// `rubato chaos` and the demos: Jepsen-style checks with real guests, clients and faults.

export { CHAOS_SERVICES, FAULTS, runChaos } from './chaos.ts';
export type { Fault } from './chaos.ts';
export { adoptDemoPassed, runAdoptDemo, serialLine } from './adopt-demo.ts';
export type { AdoptDemoResult } from './adopt-demo.ts';
export { clusterDemoPassed, runClusterDemo } from './cluster-demo.ts';
export { debianDemoPassed, runDebianDemo } from './debian-demo.ts';
export { startDebianRig } from './debian-rig.ts';
export { runDemo } from './demo.ts';
export type { DemoResult } from './demo.ts';
export { KV_WORKLOAD, clientProcess, planKvRig, startKvRig, stopKvRig } from './kv-rig.ts';
export type { KvRig, RigWorkload } from './kv-rig.ts';
