// Where each VM's primary and standby go: a pure function of the cluster's state, run by the
// leader agent. The witness is the truth about where a VM runs live: a VM's primary is its owner
// when it has one (after a failover the owner moved, and the placement follows it). A VM that
// ran before and has no owner right now keeps its placement (its standby is claiming it, or both
// copies are gone and that is the operator's call): only a VM that never ran is placed afresh.
// Standbys go to the least-loaded other host (roles counted over all VMs, ties by name), never on
// a draining host, and stay where they are while that host is up and eligible.

export interface PlacementInput {
  /** Hosts whose agents are up. */
  live: readonly string[];
  draining: ReadonlySet<string>;
  /** VM → the host holding its image (its first primary), if any. */
  vms: ReadonlyMap<string, { home: string | null }>;
  placements: ReadonlyMap<string, { primary: string; standby: string | null }>;
  owners: ReadonlyMap<string, { host: string }>;
  /** VM → highest generation ever claimed (0 or absent: never ran). */
  generations: ReadonlyMap<string, number>;
}

export interface PlacementPlan {
  /** The placement of every VM that has one (changed or not). */
  placements: Map<string, { primary: string; standby: string | null }>;
  /** VMs whose placement changed (to be written). */
  changed: string[];
  /** Placements of VMs that no longer exist (to be deleted). */
  removed: string[];
}

export function place(input: PlacementInput): PlacementPlan {
  const live = [...input.live].sort();
  const isLive = new Set(live);
  const eligible = live.filter((h) => !input.draining.has(h));
  const load = new Map<string, number>(live.map((h) => [h, 0]));
  const bump = (h: string | null) => { if (h !== null && load.has(h)) load.set(h, load.get(h)! + 1); };
  const leastLoaded = (exclude: string | null): string | null => {
    let best: string | null = null;
    for (const h of eligible) if (h !== exclude && (best === null || load.get(h)! < load.get(best)!)) best = h;
    return best;
  };
  const names = [...input.vms.keys()].sort();
  const primary = new Map<string, string>();
  // Primaries first (they are where the guests are), then kept standbys, then new standbys.
  for (const vm of names) {
    const owner = input.owners.get(vm);
    const prev = input.placements.get(vm);
    const ran = (input.generations.get(vm) ?? 0) > 0;
    let p: string | null;
    if (owner) p = owner.host;
    else if (prev && (ran || isLive.has(prev.primary))) p = prev.primary;
    else {
      const home = input.vms.get(vm)!.home;
      p = home !== null && eligible.includes(home) ? home : leastLoaded(null);
    }
    if (p === null) continue;
    primary.set(vm, p);
    bump(p);
  }
  const standby = new Map<string, string | null>();
  for (const vm of names) {
    const p = primary.get(vm);
    const prev = input.placements.get(vm)?.standby ?? null;
    if (p === undefined || prev === null || prev === p || !isLive.has(prev) || input.draining.has(prev)) continue;
    standby.set(vm, prev);
    bump(prev);
  }
  for (const vm of names) {
    const p = primary.get(vm);
    if (p === undefined || standby.has(vm)) continue;
    const s = leastLoaded(p);
    standby.set(vm, s);
    bump(s);
  }
  const placements = new Map<string, { primary: string; standby: string | null }>();
  const changed: string[] = [];
  for (const vm of names) {
    const p = primary.get(vm);
    if (p === undefined) continue;
    const next = { primary: p, standby: standby.get(vm) ?? null };
    placements.set(vm, next);
    const prev = input.placements.get(vm);
    if (!prev || prev.primary !== next.primary || prev.standby !== next.standby) changed.push(vm);
  }
  const removed = [...input.placements.keys()].filter((vm) => !input.vms.has(vm));
  return { placements, changed, removed };
}
