// What `--metrics HOST:PORT` and `--http HOST:PORT` start for a controller: its metrics, the
// dashboard and its samples.

export { AgentMetrics, ObserveServer, startObserver } from './observer.ts';
