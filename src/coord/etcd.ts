// A small client for etcd's v3 API through its JSON gateway (etcd 3.4: POST /v3/...): leases,
// ranges and transactions, which is all the witness needs. Keys and values travel base64-encoded;
// 64-bit numbers as decimal strings. Every call has a deadline; a failure is a typed error.

import { RubatoError } from '../util/index.ts';

const b64 = (s: string) => Buffer.from(s).toString('base64');
const unb64 = (s: string | undefined) => (s === undefined ? '' : Buffer.from(s, 'base64').toString('utf8'));

export interface KeyValue {
  key: string;
  value: string;
  modRevision: number;
  createRevision: number;
  lease: string | null;
}

export type Compare = { key: string; absent: true } | { key: string; modRevision: number };

export type Op = { put: string; value: string; lease?: string } | { del: string };

export class EtcdClient {
  private next = 0;
  constructor(
    private readonly endpoints: readonly string[],
    private readonly timeoutMs = 1000,
  ) {
    if (!endpoints.length) throw new RubatoError('RUBATO_CONFIG', 'etcd: no endpoint given');
  }

  get urls(): readonly string[] {
    return this.endpoints;
  }

  /** One request, to each endpoint in turn until one answers. */
  private async call<T>(path: string, body: object, timeoutMs = this.timeoutMs): Promise<T> {
    let last: unknown = null;
    for (let i = 0; i < this.endpoints.length; i++) {
      const ep = this.endpoints[(this.next + i) % this.endpoints.length]!;
      try {
        const r = await fetch(`${ep}${path}`, {
          method: 'POST',
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(timeoutMs),
        });
        const j = (await r.json()) as T & { error?: string; message?: string };
        if (!r.ok) throw new Error(j.message ?? j.error ?? `HTTP ${r.status}`);
        this.next = (this.next + i) % this.endpoints.length;
        return j;
      } catch (e) {
        last = e;
      }
    }
    throw new RubatoError(
      'RUBATO_PEER_LOST',
      `etcd ${this.endpoints.join(',')}: ${path}: ${last instanceof Error ? last.message : String(last)}`,
    );
  }

  async grantLease(ttlSec: number): Promise<string> {
    const r = await this.call<{ ID: string }>('/v3/lease/grant', { TTL: ttlSec });
    return r.ID;
  }

  /** Renews a lease; its remaining TTL in seconds (0: it has expired). */
  async keepAlive(id: string, timeoutMs?: number): Promise<number> {
    const r = await this.call<{ result?: { TTL?: string } }>('/v3/lease/keepalive', { ID: id }, timeoutMs);
    return Number(r.result?.TTL ?? 0);
  }

  async revokeLease(id: string): Promise<void> {
    await this.call('/v3/lease/revoke', { ID: id });
  }

  /** Every key under `prefix`, in key order. */
  async list(prefix: string): Promise<KeyValue[]> {
    const r = await this.call<{ kvs?: RawKv[] }>('/v3/kv/range', { key: b64(prefix), range_end: rangeEnd(prefix) });
    return (r.kvs ?? []).map(toKv);
  }

  async put(key: string, value: string, lease?: string): Promise<void> {
    await this.call('/v3/kv/put', { key: b64(key), value: b64(value), ...(lease ? { lease } : {}) });
  }

  async del(key: string): Promise<void> {
    await this.call('/v3/kv/deleterange', { key: b64(key) });
  }

  async get(key: string): Promise<KeyValue | null> {
    const r = await this.call<{ kvs?: RawKv[] }>('/v3/kv/range', { key: b64(key) });
    const kv = r.kvs?.[0];
    return kv ? toKv(kv) : null;
  }

  /** All compares hold → the ops run; else nothing does. */
  async txn(compares: readonly Compare[], ops: readonly Op[]): Promise<boolean> {
    const r = await this.call<{ succeeded?: boolean }>('/v3/kv/txn', {
      compare: compares.map((c) =>
        'absent' in c
          ? { key: b64(c.key), target: 'CREATE', result: 'EQUAL', create_revision: '0' }
          : { key: b64(c.key), target: 'MOD', result: 'EQUAL', mod_revision: String(c.modRevision) },
      ),
      success: ops.map((o) =>
        'put' in o
          ? { request_put: { key: b64(o.put), value: b64(o.value), ...(o.lease ? { lease: o.lease } : {}) } }
          : { request_delete_range: { key: b64(o.del) } },
      ),
    });
    return r.succeeded === true;
  }

  async healthy(): Promise<boolean> {
    try {
      const r = await fetch(`${this.endpoints[0]}/health`, { signal: AbortSignal.timeout(this.timeoutMs) });
      return ((await r.json()) as { health?: string }).health === 'true';
    } catch {
      return false;
    }
  }
}

/** The first key after every key that starts with `prefix` (etcd's range end for a prefix). */
function rangeEnd(prefix: string): string {
  const b = Buffer.from(prefix);
  let i = b.length - 1;
  while (i >= 0 && b[i] === 0xff) i--;
  if (i < 0) return b64('\0');
  const end = b.subarray(0, i + 1);
  end[i]! += 1;
  return end.toString('base64');
}

interface RawKv {
  key: string;
  value?: string;
  mod_revision?: string;
  create_revision?: string;
  lease?: string;
}
function toKv(kv: RawKv): KeyValue {
  return {
    key: unb64(kv.key),
    value: unb64(kv.value),
    modRevision: Number(kv.mod_revision ?? 0),
    createRevision: Number(kv.create_revision ?? 0),
    lease: kv.lease ?? null,
  };
}
