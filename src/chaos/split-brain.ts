import { logger, spawnTracked, type TrackedProcess } from '../util/index.ts';
import type { Lan, LanHost } from '../io/index.ts';

const log = logger('chaos');
/**
 * Split brain as the LAN sees it, trusting nothing of Rubato: tcpdump (Debian's) on the LAN
 * bridge's port of each host, counting the frames whose source is the guest's MAC address that
 * come in from that host (not those the bridge floods out to it, such as ARP broadcasts). Every
 * copy of the guest sends from that address; a 200 ms interval in which frames from it came in
 * through two hosts' ports is an interval in which two copies of the guest answered.
 */
export class SplitBrainDetector {
  /** Per port: each 200 ms interval with the guest's frames, and the first such frame (tcpdump's line). */
  private readonly seen = new Map<string, Map<number, string>>();
  private readonly procs: TrackedProcess[] = [];

  private constructor(private readonly ports: string[]) {}

  static async start(lan: Lan, hosts: readonly LanHost[], guestMac: string): Promise<SplitBrainDetector> {
    const d = new SplitBrainDetector(hosts.map((h) => `${h.uplink}l`));
    for (const port of d.ports) {
      const buckets = new Map<number, string>();
      d.seen.set(port, buckets);
      const p = spawnTracked(`tcpdump-${port}`, 'ip', [
        'netns',
        'exec',
        lan.lanNs,
        'tcpdump',
        '-l',
        '-n',
        '-tt',
        '-e',
        '-Q',
        'in',
        '-i',
        port,
        'ether',
        'src',
        guestMac,
      ]);
      d.procs.push(p);
      let buf = '';
      p.child.stdout?.on('data', (c: Buffer) => {
        buf += c.toString();
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          const ts = Number.parseFloat(line);
          buf = buf.slice(nl + 1);
          const b = Math.floor(ts * 5);
          if (Number.isFinite(ts) && !buckets.has(b)) buckets.set(b, line);
        }
      });
      // tcpdump says on stderr when it listens
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 3000);
        p.child.stderr?.on('data', (c: Buffer) => {
          if (/listening on/.test(c.toString())) {
            clearTimeout(t);
            resolve();
          }
        });
        void p.exited.then(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return d;
  }

  /** Stops the captures; the number of 200 ms intervals in which two hosts' ports carried the guest's frames. */
  async stop(): Promise<number> {
    for (const p of this.procs) await p.stop(2000);
    this.procs.length = 0;
    const all = [...this.seen.entries()];
    let overlaps = 0;
    const counted = new Set<number>();
    for (let i = 0; i < all.length; i++) {
      for (let j = i + 1; j < all.length; j++) {
        for (const [b, line] of all[i]![1])
          if (all[j]![1].has(b) && !counted.has(b)) {
            counted.add(b);
            overlaps++;
            const at = new Date(b * 200).toISOString().slice(11, 23);
            log.error(
              `two hosts' ports at ${at}: ${all[i]![0]} ${line.slice(0, 160)} | ${all[j]![0]} ${all[j]![1].get(b)!.slice(0, 160)}`,
            );
          }
      }
    }
    if (overlaps)
      log.error(`SPLIT BRAIN: the guest's frames came in through two hosts' ports in ${overlaps} intervals of 200 ms`);
    return overlaps;
  }
}
