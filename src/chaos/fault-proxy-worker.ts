// A CuttableProxy in its own thread: the chaos harness runs controllers in its main loop, and a
// full sync there must not stall the hosts' way to the witness or the replication link it cuts.
import { parentPort, workerData } from 'node:worker_threads';
import { CuttableProxy } from './fault-proxy.ts';

const proxy = new CuttableProxy((workerData as { targetPort: number }).targetPort);
parentPort!.on('message', (m: { op: 'blackhole' | 'heal' | 'flip' | 'close'; n?: number }) => {
  if (m.op === 'blackhole') proxy.blackhole();
  else if (m.op === 'heal') proxy.heal();
  else if (m.op === 'flip') proxy.flipBit(m.n ?? 0);
  else if (m.op === 'close') {
    proxy.close();
    parentPort!.close();
  }
});
void proxy.listen().then((port) => parentPort!.postMessage({ port }));
