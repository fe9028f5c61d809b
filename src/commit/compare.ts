// Compare mode's decision, pure: which of the primary's held frames may leave before their
// checkpoint is acknowledged because the secondary — started from the same checkpoint, given the
// same input — sent the same frame (COLO's idea; QEMU's colo-compare compares the same way).
//
// Frames are paired per connection, in order, within one epoch: the primary's frames of epoch N
// (output after checkpoint N-1) only with what the secondary sent while running from checkpoint
// N-1. A TCP segment matches on its ports, sequence and acknowledgement numbers, flags and payload
// — not on what legitimately differs between two runs of one state: the IP id, checksums, the
// window and the options (timestamps follow each VM's clock). Any other frame matches byte for
// byte but for the IPv4 id and header checksum. A connection whose frames differed (or whose
// secondary already moved past the epoch) releases nothing more of that epoch: those frames wait
// for their acknowledgement (today's rule), and the mismatch asks for a checkpoint, which brings
// the secondary back to the primary's state. A frame leaves only after every earlier frame of its
// connection left.

/** What a frame is compared by: its connection and its signature (TCP data: and its payload, as a stream). */
export interface FrameIdentity {
  flow: string;
  /** TCP: sequence, flags, then the payload (data segments: the payload's length instead; see `data`). */
  sig: Buffer;
  /** TCP: the acknowledgement number (what the sender has received of the peer's stream). */
  ack?: number;
  /** TCP without payload, SYN or FIN: only acknowledges. */
  pureAck?: boolean;
  /** TCP data (no SYN or RST): compared as a byte stream, whatever the segment boundaries. */
  data?: { seq: number; fin: boolean; payload: Buffer };
  /** A SYN (a connection opened by this side, or its answer): its initial sequence number is each VM's own. */
  syn?: { seq: number };
}

const ETH_HDR = 14;
const FIN = 0x01;
const SYN = 0x02;
const RST = 0x04;
const ACK = 0x10;

/** The TCP checksum of `tcp` (its checksum field counted as zero) inside IPv4 header `ip`. */
export function tcpChecksum(ip: Buffer, tcp: Buffer): number {
  let sum = 0;
  for (let i = 12; i < 20; i += 2) sum += ip.readUInt16BE(i); // source and destination addresses
  sum += 6 + tcp.length;
  for (let i = 0; i + 1 < tcp.length; i += 2) if (i !== 16) sum += tcp.readUInt16BE(i);
  if (tcp.length & 1) sum += tcp[tcp.length - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** A frame's IPv4 header and TCP segment (views into it), or null when it carries no TCP over IPv4. */
function ipv4Tcp(f: Buffer): { ip: Buffer; tcp: Buffer } | null {
  if (f.length < ETH_HDR + 20 || f.readUInt16BE(12) !== 0x0800) return null;
  const ip = f.subarray(ETH_HDR);
  const ihl = (ip[0]! & 0x0f) * 4;
  const total = Math.min(ip.readUInt16BE(2), ip.length);
  if (ip[9] !== 6 || ihl < 20 || total < ihl + 20) return null;
  return { ip, tcp: ip.subarray(ihl, total) };
}

/** A TCP data segment's signature: its sequence (4 bytes), flags (1) and payload length (4). */
function dataSignature(tcp: Buffer, flags: number, length: number): Buffer {
  const sig = Buffer.allocUnsafe(9);
  tcp.copy(sig, 0, 4, 8);
  sig[4] = flags;
  sig.writeUInt32BE(length, 5);
  return sig;
}

/** The key of a TCP connection's one direction, from `src:sport` to `dst:dport`. */
const tcpFlow = (src: number, sport: number, dst: number, dport: number) => `t${src}:${sport}>${dst}:${dport}`;

/** The frame (with Rubato's 4-byte length prefix) reduced to what two runs of one state must agree on. */
export function frameIdentity(prefixed: Buffer): FrameIdentity {
  const f = prefixed.subarray(4);
  const seg = ipv4Tcp(f);
  if (seg) {
    const { ip, tcp } = seg;
    const off = (tcp[12]! >> 4) * 4;
    const flow = tcpFlow(ip.readUInt32BE(12), tcp.readUInt16BE(0), ip.readUInt32BE(16), tcp.readUInt16BE(2));
    // seq (4), flags (1), payload: the ack is compared apart (the secondary's must have reached it)
    const payload = tcp.subarray(Math.min(off, tcp.length));
    const flags = tcp[13]!;
    const isData = payload.length > 0 && (flags & (SYN | RST)) === 0;
    // TCP data is compared as a byte stream (`data`), never by its signature: its signature holds
    // the payload's length, not a copy of the payload (which was copied for every frame of both
    // VMs). Nine bytes: it cannot equal the five of a segment without payload.
    const sig = isData
      ? dataSignature(tcp, flags, payload.length)
      : Buffer.concat([tcp.subarray(4, 8), tcp.subarray(13, 14), payload]);
    const id: FrameIdentity = {
      flow,
      sig,
      ack: tcp.readUInt32BE(8),
      pureAck: payload.length === 0 && (flags & 0x07) === 0,
    };
    if (isData) id.data = { seq: tcp.readUInt32BE(4), fin: (flags & FIN) !== 0, payload };
    if (flags & SYN) id.syn = { seq: tcp.readUInt32BE(4) };
    return id;
  }
  if (f.length >= ETH_HDR + 20 && f.readUInt16BE(12) === 0x0800) {
    const proto = f[ETH_HDR + 9]!;
    const sig = Buffer.from(f);
    sig.fill(0, ETH_HDR + 4, ETH_HDR + 6); // IP id
    sig.fill(0, ETH_HDR + 10, ETH_HDR + 12); // header checksum
    return { flow: `p${proto}`, sig };
  }
  return { flow: f.length >= ETH_HDR ? `e${f.readUInt16BE(12)}` : 'e', sig: f };
}

interface PrimaryEntry {
  seq: number;
  epoch: number;
  sig: Buffer;
  ack?: number | undefined;
  pureAck?: boolean | undefined;
  data?: FrameIdentity['data'];
  syn?: FrameIdentity['syn'];
}
interface SecondaryEntry {
  epoch: number;
  sig: Buffer;
  data?: FrameIdentity['data'];
  syn?: FrameIdentity['syn'];
  /** TCP data: bytes of it already compared with the primary's. */
  used: number;
}
interface Flow {
  p: PrimaryEntry[];
  s: SecondaryEntry[];
  /** The epoch whose frames differed on this connection (they wait for its acknowledgement), or -1. */
  diverged: number;
  /** TCP: the highest acknowledgement the secondary sent (it has received the peer's stream up to it), or null. */
  secondaryAck: number | null;
  /** TCP: the primary's stream is verified and released up to here (a retransmission below it leaves), or null. */
  verifiedEnd: number | null;
  /**
   * TCP: a connection this side's SYN opened in `epoch` — the two VMs chose their own initial sequence numbers, so
   * the secondary's numbers of that epoch are the primary's minus `delta` (QEMU's filter-rewriter does the same). From
   * the next checkpoint on the secondary holds the primary's connection, numbers and all.
   */
  isn: { epoch: number; delta: number } | null;
}

/** `a` at or after `b` in TCP's 32-bit sequence space. */
const seqAtLeast = (a: number, b: number): boolean => ((a - b) | 0) >= 0;

export interface CompareCounts {
  matched: number;
  mismatches: number;
  /** Secondary frames dropped: of an epoch already acknowledged, or past the bound. */
  stale: number;
  /** The last difference seen, in a few words (status shows it), or null. */
  lastMismatch: string | null;
  /** Differences by kind: where the secondary's TCP data differed in bytes, sat at another sequence, was a control segment or lacked a FIN; or a whole frame (not TCP data) differed. */
  kinds: Record<MismatchKind, number>;
}

export type MismatchKind = 'data' | 'sequence' | 'control' | 'fin' | 'frame';

/** A secondary frame waits this long at most per connection for the primary's (bounded memory). */
const MAX_SECONDARY_PER_FLOW = 1024;
const MAX_FLOWS = 4096;

export class FrameComparator {
  private readonly flows = new Map<string, Flow>();
  private acked = -1;
  /** The latest epoch in which a connection's SYNs were numbered apart (its input is rewritten in that epoch). */
  private isnEpoch = -1;
  readonly counts: CompareCounts = {
    matched: 0,
    mismatches: 0,
    stale: 0,
    lastMismatch: null,
    kinds: { data: 0, sequence: 0, control: 0, fin: 0, frame: 0 },
  };

  private flow(key: string): Flow {
    let fl = this.flows.get(key);
    if (!fl) {
      if (this.flows.size >= MAX_FLOWS) this.prune();
      fl = { p: [], s: [], diverged: -1, secondaryAck: null, verifiedEnd: null, isn: null };
      this.flows.set(key, fl);
    }
    return fl;
  }

  /**
   * A primary frame was held as `seq` in `epoch`. Returns the held frames that may leave now (in
   * order), with whether a mismatch was found.
   */
  primary(seq: number, epoch: number, frame: Buffer): { release: PrimaryEntry[]; mismatch: boolean } {
    const id = frameIdentity(frame);
    const fl = this.flow(id.flow);
    fl.p.push({ seq, epoch, sig: id.sig, ack: id.ack, pureAck: id.pureAck, data: id.data, syn: id.syn });
    return this.match(fl);
  }

  /** The secondary, running in `epoch` (from checkpoint epoch - 1), sent `frame`. */
  secondary(epoch: number, frame: Buffer): { release: PrimaryEntry[]; mismatch: boolean } {
    if (epoch <= this.acked) {
      this.counts.stale++;
      return { release: [], mismatch: false };
    }
    const id = frameIdentity(frame);
    const fl = this.flow(id.flow);
    if (id.ack !== undefined && (fl.secondaryAck === null || seqAtLeast(id.ack, fl.secondaryAck)))
      fl.secondaryAck = id.ack;
    // A bare acknowledgement only says how far the secondary has received (its timing is its own).
    if (id.pureAck) return this.match(fl);
    if (fl.s.length >= MAX_SECONDARY_PER_FLOW) {
      fl.s.shift();
      this.counts.stale++;
    }
    fl.s.push({ epoch, sig: id.sig, data: id.data, syn: id.syn, used: 0 });
    return this.match(fl);
  }

  /**
   * Checkpoint `epoch` was acknowledged: output commit released every frame up to it; they are
   * forgotten here, and connections they blocked may match on.
   */
  acknowledged(epoch: number): { release: PrimaryEntry[]; mismatch: boolean } {
    this.acked = Math.max(this.acked, epoch);
    const release: PrimaryEntry[] = [];
    let mismatch = false;
    for (const [key, fl] of this.flows) {
      while (fl.p.length && fl.p[0]!.epoch <= epoch) {
        // Data released by the acknowledgement is committed: the secondary holds it from the
        // checkpoint on, and a retransmission of it may leave as one of compared data may.
        const d = fl.p.shift()!.data;
        if (d) {
          const end = (d.seq + d.payload.length) | 0;
          if (fl.verifiedEnd === null || seqAtLeast(end, fl.verifiedEnd)) fl.verifiedEnd = end;
        }
      }
      while (fl.s.length && fl.s[0]!.epoch <= epoch) fl.s.shift();
      if (fl.diverged <= epoch) fl.diverged = -1;
      const r = this.match(fl);
      release.push(...r.release);
      mismatch ||= r.mismatch;
      // (a connection's verified end and SYN numbers outlive its frames: kept until the bound prunes)
      if (!fl.p.length && !fl.s.length && fl.verifiedEnd === null && !(fl.isn && fl.isn.epoch > epoch))
        this.flows.delete(key);
    }
    return { release, mismatch };
  }

  /** Protection restarts (a new image) or ends: nothing held is paired any more. */
  reset(): void {
    this.flows.clear();
    this.isnEpoch = -1;
    this.acked = -1;
  }

  private match(fl: Flow): { release: PrimaryEntry[]; mismatch: boolean } {
    const release: PrimaryEntry[] = [];
    let mismatch = false;
    for (;;) {
      const p = fl.p[0];
      if (!p) break;
      // The primary's bare acknowledgement leaves once the secondary acknowledged as much: the
      // peer's data it confirms is in the secondary (which goes on at failover), not only here.
      if (p.pureAck) {
        if (fl.diverged === p.epoch || !this.secondaryHas(fl, p)) break;
        fl.p.shift();
        release.push(p);
        this.counts.matched++;
        continue;
      }
      if (p.data) {
        if (fl.diverged === p.epoch) break;
        const r = this.matchData(fl, p);
        if (r === 'wait') break;
        if (r === 'differ') {
          fl.diverged = p.epoch;
          this.counts.lastMismatch = this.why;
          this.counts.kinds[this.whyKind]++;
          this.counts.mismatches++;
          mismatch = true;
          break;
        }
        if (!this.secondaryHas(fl, p)) break;
        if (r.take) {
          fl.s.splice(0, r.take.i);
          if (fl.s[0]) fl.s[0].used = r.take.used;
        }
        fl.p.shift();
        release.push(p);
        this.counts.matched++;
        const end = (p.data.seq + p.data.payload.length) | 0;
        if (fl.verifiedEnd === null || seqAtLeast(end, fl.verifiedEnd)) fl.verifiedEnd = end;
        continue;
      }
      const s = fl.s[0];
      if (!s) break;
      if (s.epoch < p.epoch) {
        fl.s.shift(); // the secondary's output of an epoch whose primary frames all left
        continue;
      }
      if (fl.diverged === p.epoch) break;
      // The secondary already runs from checkpoint p.epoch (so it is acknowledged) without having
      // sent this frame: it leaves with that acknowledgement.
      if (s.epoch > p.epoch) break;
      if (p.syn && s.syn && s.sig.subarray(4).equals(p.sig.subarray(4))) {
        // The same SYN but for its initial sequence number: the secondary's numbers on this
        // connection differ by as much in this epoch (and its input is rewritten to match).
        fl.isn = { epoch: p.epoch, delta: (p.syn.seq - s.syn.seq) | 0 };
        this.isnEpoch = Math.max(this.isnEpoch, p.epoch);
      } else if (!this.shifted(fl, s).equals(p.sig)) {
        fl.diverged = p.epoch;
        this.counts.lastMismatch = describeMismatch(p.sig, s.sig);
        this.counts.kinds.frame++;
        this.counts.mismatches++;
        mismatch = true;
        break;
      }
      // The same data; it leaves once the secondary has received what it acknowledges.
      if (!this.secondaryHas(fl, p)) break;
      fl.p.shift();
      fl.s.shift();
      release.push(p);
      this.counts.matched++;
    }
    return { release, mismatch };
  }

  /**
   * A primary TCP data segment against the secondary's stream of the same epoch, whatever either
   * side's segment boundaries: a match (the secondary sent the same bytes at the same sequence;
   * `take` says how far its entries are used then, once the frame leaves), 'differ', or 'wait' (not all sent yet, or the secondary's next
   * output is of a later epoch: the segment then waits for its acknowledgement). A segment wholly
   * below what was verified and released already on this connection is a retransmission: it matches.
   */
  private matchData(fl: Flow, p: PrimaryEntry): { take: { i: number; used: number } | null } | 'differ' | 'wait' {
    const d = p.data!;
    const end = (d.seq + d.payload.length) | 0;
    if (!d.fin && fl.verifiedEnd !== null && seqAtLeast(fl.verifiedEnd, end)) return { take: null };
    const delta = fl.isn?.epoch === p.epoch ? fl.isn.delta : 0; // (only the secondary's entries of p.epoch are compared)
    // Dry run over the secondary's entries; consumed only on a match. A segment that starts below
    // what was verified (a retransmission joined to new data) is compared from there on.
    let pos = d.seq | 0;
    let done = 0;
    if (fl.verifiedEnd !== null) {
      const verified = (fl.verifiedEnd - pos) | 0;
      if (verified > 0 && verified < d.payload.length) {
        done = verified;
        pos = fl.verifiedEnd;
      }
    }
    let i = 0;
    let used = fl.s[0]?.used ?? 0;
    let finSeen = false;
    while (done < d.payload.length) {
      const s = fl.s[i];
      if (!s) return 'wait';
      if (s.epoch < p.epoch) {
        i++;
        used = fl.s[i]?.used ?? 0;
        continue;
      }
      if (s.epoch > p.epoch) return 'wait';
      if (!s.data)
        // where the primary sent data
        return this.differ(
          'control',
          `the secondary sent a control segment (TCP flags 0x${(s.sig[4] ?? 0).toString(16)})`,
          d,
        );
      const sStart = (s.data.seq + delta + used) | 0;
      const sLen = s.data.payload.length - used;
      if (sStart !== pos) {
        // the secondary's retransmission of bytes before this point: skip what lies below it
        const behind = (pos - sStart) | 0;
        if (behind > 0 && behind < 1 << 30) {
          if (behind >= sLen) {
            i++;
            used = fl.s[i]?.used ?? 0;
          } else used += behind;
          continue;
        }
        const ahead = (sStart - pos) | 0;
        if (ahead > 0 && ahead < 1 << 30) {
          // Bytes past what the primary sent: sent by the secondary before the checkpoint it was
          // brought back to, but read by its standby only after the load, so tagged with this
          // epoch (QEMU's TX queue may still hold them then). Its run since the load sends them
          // again: a later entry of the epoch that holds this point is compared instead, else
          // the segment waits (for its acknowledgement, if nothing comes).
          const next = this.entryHolding(fl, i + 1, p.epoch, pos, delta);
          if (next < 0) return 'wait';
          i = next;
          used = fl.s[i]!.used;
          continue;
        }
        return this.differ('sequence', `the secondary's data is at sequence ${sStart >>> 0}`, d);
      }
      const n = Math.min(sLen, d.payload.length - done);
      if (!d.payload.subarray(done, done + n).equals(s.data.payload.subarray(used, used + n)))
        return this.differ('data', `the secondary sent ${hex(s.data.payload.subarray(used, used + n))}`, d);
      done += n;
      pos = (pos + n) | 0;
      used += n;
      if (used === s.data.payload.length) {
        finSeen = s.data.fin;
        i++;
        used = fl.s[i]?.used ?? 0;
      } else finSeen = false;
    }
    if (d.fin && !finSeen) {
      // the secondary may send its FIN in a segment of its own, right after the data
      const s = fl.s[i];
      if (!s) return 'wait';
      if (s.epoch > p.epoch) return 'wait';
      const finOnly =
        !s.data && s.sig.length === 5 && (s.sig[4]! & FIN) !== 0 && ((s.sig.readUInt32BE(0) + delta) | 0) === pos;
      return finOnly && used === 0
        ? { take: { i: i + 1, used: 0 } }
        : this.differ('fin', 'the secondary sent no FIN there', d);
    }
    // (a FIN the secondary sent with this data, where the primary sends it later, is compared then)
    return { take: { i, used } };
  }

  /** The first secondary data entry from `from` on, of `epoch`, whose unused bytes hold `pos` (or -1). */
  private entryHolding(fl: Flow, from: number, epoch: number, pos: number, delta: number): number {
    for (let j = from; j < fl.s.length; j++) {
      const e = fl.s[j]!;
      if (e.epoch > epoch) return -1;
      if (e.epoch < epoch || !e.data) continue;
      const start = (e.data.seq + delta + e.used) | 0;
      const end = (e.data.seq + delta + e.data.payload.length) | 0;
      if (seqAtLeast(pos, start) && ((end - pos) | 0) > 0) return j;
    }
    return -1;
  }

  private why = '';
  private whyKind: MismatchKind = 'data';
  /** A difference in TCP data, described for the operator (status shows the last one). */
  private differ(kind: MismatchKind, what: string, d: NonNullable<FrameIdentity['data']>): 'differ' {
    this.whyKind = kind;
    this.why = `TCP data at sequence ${d.seq} (${d.payload.length} bytes: ${hex(d.payload)}) differs: ${what}`;
    return 'differ';
  }

  /** A secondary entry's signature in the primary's sequence numbers (TCP: its first 4 bytes are the sequence). */
  private shifted(fl: Flow, s: SecondaryEntry): Buffer {
    if (!fl.isn || fl.isn.epoch !== s.epoch || s.sig.length < 4) return s.sig; // (only TCP flows have an isn)
    const sig = Buffer.from(s.sig);
    sig.writeUInt32BE((sig.readUInt32BE(0) + fl.isn.delta) >>> 0, 0);
    return sig;
  }

  /**
   * A frame from outside for the guest, as the secondary must get it in `epoch`: on a connection
   * whose SYN the two VMs numbered differently in that epoch, its acknowledgement (and SACK edges)
   * are moved into the secondary's numbers, and its TCP checksum is computed again. Returns the
   * frame itself when nothing changes, else a rewritten copy (the primary's guest gets the original).
   */
  toSecondary(epoch: number, prefixed: Buffer): Buffer {
    if (epoch !== this.isnEpoch) return prefixed; // (no connection opened apart in this epoch: the usual case)
    const seg = ipv4Tcp(prefixed.subarray(4));
    if (!seg || (seg.tcp[13]! & ACK) === 0) return prefixed;
    const { ip, tcp } = seg;
    // the guest's side of this connection: the reverse of the frame's direction
    const isn = this.flows.get(
      tcpFlow(ip.readUInt32BE(16), tcp.readUInt16BE(2), ip.readUInt32BE(12), tcp.readUInt16BE(0)),
    )?.isn;
    if (!isn || isn.epoch !== epoch || isn.delta === 0) return prefixed;
    const out = Buffer.from(prefixed);
    const oip = out.subarray(4 + ETH_HDR, 4 + ETH_HDR + ip.length);
    const otcp = oip.subarray(tcp.byteOffset - ip.byteOffset, tcp.byteOffset - ip.byteOffset + tcp.length);
    const back = (v: number) => (v - isn.delta) >>> 0;
    otcp.writeUInt32BE(back(otcp.readUInt32BE(8)), 8);
    // SACK blocks (option 5) name the guest's sequence numbers too
    const off = Math.min((otcp[12]! >> 4) * 4, otcp.length);
    for (let i = 20; i < off; ) {
      const kind = otcp[i]!;
      if (kind === 0) break;
      if (kind === 1) {
        i++;
        continue;
      }
      const len = otcp[i + 1] ?? 0;
      if (len < 2 || i + len > off) break;
      if (kind === 5) for (let e = i + 2; e + 4 <= i + len; e += 4) otcp.writeUInt32BE(back(otcp.readUInt32BE(e)), e);
      i += len;
    }
    otcp.writeUInt16BE(tcpChecksum(oip, otcp), 16);
    return out;
  }

  private secondaryHas(fl: Flow, p: PrimaryEntry): boolean {
    return p.ack === undefined || (fl.secondaryAck !== null && seqAtLeast(fl.secondaryAck, p.ack));
  }

  /** Connections with nothing waiting are forgotten first. */
  private prune(): void {
    for (const [key, fl] of this.flows) if (!fl.p.length) this.flows.delete(key);
  }
}

/** Where two signatures part (TCP: sequence, flags or payload), for the operator. */
function describeMismatch(p: Buffer, s: Buffer): string {
  let i = 0;
  while (i < p.length && i < s.length && p[i] === s[i]) i++;
  return `${p.length} vs ${s.length} bytes compared, first difference at byte ${i}`;
}

/** The first bytes of a payload, in hex (for the operator). */
function hex(b: Buffer): string {
  return b.length > 8 ? `${b.subarray(0, 8).toString('hex')}…` : b.toString('hex');
}
