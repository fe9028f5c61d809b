// `rubato agent`: one per host, bringing its share of the cluster to what the placement says.

export { Agent } from './agent.ts';
