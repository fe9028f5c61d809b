// The witness on a real etcd (Debian's etcd-server, started by Rubato on loopback): one owner per
// VM at a time, the generation (fencing token) only grows, a holder cut off from etcd gives up
// before its lease can expire and another host claim the VM, and without etcd nobody claims.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';
import { sleep } from '../../src/util/async.ts';
import { ensurePackages } from '../../src/setup/index.ts';
import { LocalEtcd } from '../../src/coord/local-etcd.ts';
import { EtcdClient } from '../../src/coord/etcd.ts';
import { Ownership, currentOwner, LOSS_FRACTION } from '../../src/coord/ownership.ts';
import { CuttableProxy } from '../helpers/proxy.ts';

test('witness: one owner at a time; a holder cut from etcd gives up before another claims; the generation only grows; no etcd, no claim', { timeout: 120_000 }, async () => {
  await ensurePackages();
  const dir = makeTempDir('rubato-witness-');
  const etcd = await LocalEtcd.start(dir);
  const port = Number(new URL(etcd.url).port);
  const proxy = new CuttableProxy(port);
  await proxy.listen();
  const direct = new EtcdClient([etcd.url], 500);
  try {
    const a = new Ownership(new EtcdClient([`http://127.0.0.1:${proxy.port}`], 300), 'vm1', 'ha', 2);
    const b = new Ownership(direct, 'vm1', 'hb', 2);
    assert.equal(await a.claim(), 1);
    assert.equal(await b.claim(), null, 'held by ha');
    assert.deepEqual(await currentOwner(direct, 'vm1'), { host: 'ha', generation: 1 });
    await sleep(2500); // ha keeps it by renewing, longer than its TTL
    assert.equal(await b.claim(), null, 'still held by ha after a TTL: renewed');

    let lostAt = 0;
    a.onLost = () => { lostAt = Date.now(); };
    const cutAt = Date.now();
    proxy.blackhole(); // ha is cut off from etcd (alive, but silent to the witness)
    let gen: number | null = null;
    while (gen === null && Date.now() - cutAt < 10_000) { gen = await b.claim(); if (gen === null) await sleep(100); }
    const claimedAt = Date.now();
    assert.equal(gen, 2, 'hb claimed the VM after ha\'s lease expired, with the next generation');
    assert.ok(lostAt > 0 && lostAt < claimedAt, `ha gave up (${lostAt - cutAt} ms after the cut) before hb claimed (${claimedAt - cutAt} ms)`);
    assert.ok(lostAt - cutAt <= 2000 * LOSS_FRACTION + 600, 'within two thirds of the TTL (plus one renewal period)');
    assert.equal(a.held, false);

    const a2 = new Ownership(direct, 'vm1', 'ha', 2);
    assert.equal(await a2.claim(), null, 'ha cannot take it back while hb holds it');
    await b.release();
    assert.equal(await a2.claim(), 3, 'released in order: the next claim gets generation 3');
    await a2.release();

    await etcd.stop();
    const c = new Ownership(new EtcdClient([etcd.url], 300), 'vm1', 'hc', 2);
    await assert.rejects(c.claim(), (e: unknown) => isRubatoError(e, 'RUBATO_PEER_LOST'), 'no etcd: the claim fails, nobody goes live');
  } finally {
    proxy.close();
    await etcd.stop();
    removeTempDir(dir);
  }
});
