// A guest's I/O on a host: its NIC's relay behind a TAP, its disk's NBD server, and the namespaces,
// bridges and shaped links of test topologies.

export { allocatedExtents, extentBytes } from './disk/extents.ts';
export type { Extent } from './disk/extents.ts';
export { prepareDisk } from './disk/image.ts';
export type { PreparedDisk } from './disk/image.ts';
export { NbdServer } from './disk/nbd-server.ts';
export { DiskSet, diskBlockId, isDiskBlockId } from './disk/disk-set.ts';
export type { DiskSetCut } from './disk/disk-set.ts';
export { GuestIo } from './guest-io.ts';
export { Lan } from './net/lan.ts';
export type { LanHost } from './net/lan.ts';
export { TwoHosts, ip } from './net/netns.ts';
export { checkBridge } from './net/tap.ts';
export { Framer, NetRelay } from './net/relay.ts';
export { RelaySet } from './net/relay-set.ts';
export type { GuestNet } from './net/relay-set.ts';
export { LINK_CLASSES, ShapedLink } from './net/shaped-link.ts';
export type { LinkClass } from './net/shaped-link.ts';
