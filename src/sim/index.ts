// The simulators: trace replay of the scheduler and the deterministic fault simulator, both
// driving the real pipeline and state machines.

export { simulateProfile, simulateTrace } from './cli.ts';
export { BANDWIDTH_CLASSES, curveFor, workloadFor } from './extrapolate.ts';
export type { MeasuredCurve } from './extrapolate.ts';
export { simulate } from './simulate.ts';
export type { SimClients } from './simulate.ts';
export { TraceRecorder, loadTrace, pauseBusyMsOf, writeTrace } from './trace.ts';
