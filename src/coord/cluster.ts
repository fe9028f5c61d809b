// The many-hosts state in the witness (etcd): which hosts are up, which VMs exist, where each runs
// and where its standby is. Keys (JSON values):
//   /rubato/hosts/H          {name, address}           on H's agent lease: gone when H stops renewing
//   /rubato/drain/H          {since}                   H is being drained (`rubato host drain`)
//   /rubato/vms/V            {definition, home, added} `rubato vm add`; home: the host holding the image
//   /rubato/placement/V      {primary, standby}        written by the leader agent only
//   /rubato/endpoint/V       {host, address, port}     V's standby listening, on its controller's lease
//   /rubato/status/V         {host, protected, ...}    V's running copy, on its controller's lease
//   /rubato/leader           {host}                    the agent that places, on its lease
// Ownership (who may run V live) stays in /rubato/vm/V/{owner,generation} (ownership.ts).

import { z } from 'zod';
import { VmDefinitionSchema } from '../qemu/index.ts';
import { logger, errorMessage } from '../util/index.ts';
import type { EtcdClient, KeyValue } from './etcd.ts';

const log = logger('cluster');

export const KEYS = {
  host: (h: string) => `/rubato/hosts/${h}`,
  hosts: '/rubato/hosts/',
  drain: (h: string) => `/rubato/drain/${h}`,
  drains: '/rubato/drain/',
  vm: (v: string) => `/rubato/vms/${v}`,
  vms: '/rubato/vms/',
  placement: (v: string) => `/rubato/placement/${v}`,
  placements: '/rubato/placement/',
  endpoint: (v: string) => `/rubato/endpoint/${v}`,
  endpoints: '/rubato/endpoint/',
  status: (v: string) => `/rubato/status/${v}`,
  statuses: '/rubato/status/',
  leader: '/rubato/leader',
  owners: '/rubato/vm/',
} as const;

export const HostRecord = z.object({ name: z.string(), address: z.string() });
export type HostRecord = z.infer<typeof HostRecord>;
export const VmRecord = z.object({ definition: VmDefinitionSchema, home: z.string().nullable(), added: z.number() });
export type VmRecord = z.infer<typeof VmRecord>;
export const Placement = z.object({ primary: z.string(), standby: z.string().nullable() });
export type Placement = z.infer<typeof Placement>;
export const Endpoint = z.object({ host: z.string(), address: z.string(), port: z.number().int() });
export type Endpoint = z.infer<typeof Endpoint>;
export const VmStatus = z.object({
  host: z.string(),
  protected: z.boolean(),
  reason: z.string().nullable(),
  generation: z.number().nullable(),
  epoch: z.number(),
  standby: z.string().nullable(),
  at: z.number(),
});
export type VmStatus = z.infer<typeof VmStatus>;

/** name → value for every key under `prefix` whose value parses (a foreign or torn value is skipped, said once). */
export function byName<T>(kvs: readonly KeyValue[], prefix: string, schema: z.ZodType<T>): Map<string, T> {
  const out = new Map<string, T>();
  for (const kv of kvs) {
    const name = kv.key.slice(prefix.length);
    if (!name || name.includes('/')) continue;
    try {
      out.set(name, schema.parse(JSON.parse(kv.value)));
    } catch (e) {
      log.debug(`ignoring ${kv.key}: ${errorMessage(e)}`);
    }
  }
  return out;
}

/** Everything an agent or `rubato vm list` needs, in one consistent-enough read. */
export interface ClusterView {
  hosts: Map<string, HostRecord>;
  drains: Set<string>;
  vms: Map<string, VmRecord>;
  placements: Map<string, Placement>;
  endpoints: Map<string, Endpoint>;
  statuses: Map<string, VmStatus>;
  /** VM → {host, generation} of its current owner (absent: nobody runs it live). */
  owners: Map<string, { host: string; generation: number }>;
  /** VM → highest generation ever claimed (0: never ran). */
  generations: Map<string, number>;
  leader: string | null;
}

export async function readCluster(etcd: EtcdClient): Promise<ClusterView> {
  const [hosts, drains, vms, placements, endpoints, statuses, owned, leader] = await Promise.all([
    etcd.list(KEYS.hosts),
    etcd.list(KEYS.drains),
    etcd.list(KEYS.vms),
    etcd.list(KEYS.placements),
    etcd.list(KEYS.endpoints),
    etcd.list(KEYS.statuses),
    etcd.list(KEYS.owners),
    etcd.get(KEYS.leader),
  ]);
  const owners = new Map<string, { host: string; generation: number }>();
  const generations = new Map<string, number>();
  for (const kv of owned) {
    const m = /^\/rubato\/vm\/([^/]+)\/(owner|generation)$/.exec(kv.key);
    if (!m) continue;
    try {
      if (m[2] === 'owner')
        owners.set(m[1]!, z.object({ host: z.string(), generation: z.number() }).parse(JSON.parse(kv.value)));
      else generations.set(m[1]!, Number(kv.value) || 0);
    } catch {
      /* a torn value: as if absent */
    }
  }
  let leaderName: string | null = null;
  try {
    leaderName = leader ? (JSON.parse(leader.value) as { host: string }).host : null;
  } catch {
    /* as if none */
  }
  return {
    hosts: byName(hosts, KEYS.hosts, HostRecord),
    drains: new Set(drains.map((kv) => kv.key.slice(KEYS.drains.length))),
    vms: byName(vms, KEYS.vms, VmRecord),
    placements: byName(placements, KEYS.placements, Placement),
    endpoints: byName(endpoints, KEYS.endpoints, Endpoint),
    statuses: byName(statuses, KEYS.statuses, VmStatus),
    owners,
    generations,
    leader: leaderName,
  };
}

/**
 * A lease of one process, renewed every TTL/4, and the keys it keeps on it (they vanish within
 * the TTL once the process is gone). Renewal failures are retried; an expired lease is replaced
 * and its keys put again.
 */
export class LeasedKeys {
  private lease: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private readonly keys = new Map<string, string>();
  /** Keys taken with putIfAbsent: after an expiry they are somebody else's to take. */
  private readonly exclusive = new Set<string>();

  constructor(
    private readonly etcd: EtcdClient,
    private readonly ttlSec: number,
  ) {}

  async put(key: string, value: string): Promise<void> {
    this.keys.set(key, value);
    await this.etcd.put(key, value, await this.leaseId());
    this.start();
  }

  /** Puts `key` only if no other lease holds it; true if this process holds it now. */
  async putIfAbsent(key: string, value: string): Promise<boolean> {
    const lease = await this.leaseId();
    const cur = await this.etcd.get(key);
    if (cur && cur.lease !== lease) return false;
    const ok = cur ? true : await this.etcd.txn([{ key, absent: true }], [{ put: key, value, lease }]);
    if (ok) {
      this.exclusive.add(key);
      this.start();
    }
    return ok;
  }

  /** Whether this process holds `key` (taken with putIfAbsent, lease not expired). */
  holds(key: string): boolean {
    return this.exclusive.has(key);
  }

  async delete(key: string): Promise<void> {
    this.keys.delete(key);
    this.exclusive.delete(key);
    await this.etcd.del(key);
  }

  private async leaseId(): Promise<string> {
    return (this.lease ??= await this.etcd.grantLease(this.ttlSec));
  }

  private start(): void {
    if (this.timer) return;
    this.timer = setInterval(
      () => {
        void this.renew();
      },
      Math.max(100, (this.ttlSec * 1000) / 4),
    );
    this.timer.unref();
  }

  private async renew(): Promise<void> {
    if (!this.lease) return;
    try {
      if ((await this.etcd.keepAlive(this.lease)) > 0) return;
      // Expired (etcd was away for longer than the TTL): a new lease, the keys again.
      this.lease = null;
      this.exclusive.clear();
      const lease = await this.leaseId();
      for (const [k, v] of this.keys) await this.etcd.put(k, v, lease);
    } catch (e) {
      log.debug(`renewing a lease: ${errorMessage(e)}`);
    }
  }

  /** Ends the lease: its keys go at once. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    const lease = this.lease;
    this.lease = null;
    if (lease) await this.etcd.revokeLease(lease).catch(() => {});
  }
}

/** Where VM `vm`'s standby listens, per the witness (a standby on `self` does not count: it is us). */
export function standbyLookup(
  etcd: EtcdClient,
  vm: string,
  self: string,
): () => Promise<{ host: string; port: number } | null> {
  return async () => {
    const kv = await etcd.get(KEYS.endpoint(vm));
    if (!kv) return null;
    const e = Endpoint.safeParse(JSON.parse(kv.value));
    return e.success && e.data.host !== self ? { host: e.data.address, port: e.data.port } : null;
  };
}

/** Publishes a running copy's protection state (for `rubato vm list` and drains) every second, on `keys`' lease. */
export function publishStatus(
  keys: LeasedKeys,
  vm: string,
  host: string,
  snapshot: () => Record<string, unknown>,
): () => void {
  const put = () => {
    const s = snapshot();
    const status: VmStatus = {
      host,
      protected: s['protected'] === true,
      reason: typeof s['unprotectedReason'] === 'string' ? s['unprotectedReason'] : null,
      generation: typeof s['generation'] === 'number' ? s['generation'] : null,
      epoch: typeof s['epoch'] === 'number' ? s['epoch'] : 0,
      standby: typeof s['standby'] === 'string' ? s['standby'] : null,
      at: Date.now(),
    };
    keys
      .put(KEYS.status(vm), JSON.stringify(status))
      .catch((e: unknown) => log.debug(`publishing the status of ${vm}: ${errorMessage(e)}`));
  };
  put();
  const t = setInterval(put, 1000);
  t.unref();
  return () => clearInterval(t);
}

export interface VmRow {
  vm: string;
  primary: string | null;
  standby: string | null;
  generation: number;
  state: string;
  protected: boolean;
  epoch: number | null;
}

/** One row per VM: where it runs (the witness's owner), its standby, generation and protection. */
export function vmRows(v: ClusterView): VmRow[] {
  return [...v.vms.keys()].sort().map((vm) => {
    const owner = v.owners.get(vm);
    const p = v.placements.get(vm);
    const st = v.statuses.get(vm);
    const fresh = st && owner && st.host === owner.host;
    const state = !p
      ? 'unplaced (no host up)'
      : !owner
        ? (v.generations.get(vm) ?? 0) > 0
          ? 'down: no copy runs (a standby may be taking over)'
          : 'starting'
        : !fresh
          ? 'running (status not yet reported)'
          : st.protected
            ? 'protected'
            : `unprotected: ${st.reason ?? 'no standby'}`;
    return {
      vm,
      primary: owner?.host ?? p?.primary ?? null,
      standby: p?.standby ?? null,
      generation: owner?.generation ?? v.generations.get(vm) ?? 0,
      state,
      protected: !!(fresh && st.protected),
      epoch: fresh ? st.epoch : null,
    };
  });
}
