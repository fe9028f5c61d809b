// The standby's wire boundary on real sockets: a bad key, a wrong protocol version, truncated and
// corrupted frames are each refused with a clear error, and the replica stays exactly as it was.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createServer, type Socket } from 'node:net';
import { createHmac, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { StandbyController } from '../../src/replication/standby.ts';
import { ReplicaStore } from '../../src/replication/replica-store.ts';
import { Link } from '../../src/replication/link.ts';
import { connectHandshake } from '../../src/replication/handshake.ts';
import { FrameType, HEADER_BYTES, helloKeys, rejectTag } from '../../src/replication/protocol/frame.ts';
import { encodeChallenge } from '../../src/replication/protocol/messages.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';
import { stockQemu } from '../../src/setup/setup.ts';

const psk = randomBytes(32);
let dir: string;
let standby: StandbyController;
let imageBefore: Buffer;
const identity = {
  vm: 'p',
  spec: { name: 'p', accel: 'tcg' as const, cpus: 1, memMb: 64, kernel: 'k', initrd: 'i', append: '' },
};

before(async () => {
  dir = makeTempDir('rubato-proto-');
  const base = {
    machine: 'pc-i440fx-7.2',
    blocks: [{ id: 'mem0', lengthBytes: 16 * 4096 }],
    ram: new Map([['mem0', randomBytes(16 * 4096)]]),
    deviceState: Buffer.from([4, 1, 0]),
  };
  await ReplicaStore.create(join(dir, 'replica'), 'p', base, { fsync: false });
  writeFileSync(join(dir, 'vm.json'), JSON.stringify(identity));
  imageBefore = readFileSync(join(dir, 'replica', 'ram', '0.img'));
  standby = new StandbyController({
    host: '127.0.0.1',
    port: 0,
    stateDir: dir,
    psk,
    heartbeatMs: 50,
    timeoutMs: 2000,
    binaryFor: async () => stockQemu(),
    autoFailover: false,
    fsync: false,
  });
  await standby.start();
});

after(async () => {
  await standby.stop();
  removeTempDir(dir);
});

function dial(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port: standby.boundPort }, () => resolve(s));
    s.once('error', reject);
  });
}

function replicaIntact() {
  assert.equal(standby.replicaEpoch, 0);
  assert.deepEqual(readFileSync(join(dir, 'replica', 'ram', '0.img')), imageBefore);
}

const closed = (l: Link) => new Promise<Error>((r) => (l.closed ? r(l.closed) : l.once('close', r)));

test('a primary with the wrong key is refused', async () => {
  const link = new Link(await dial(), randomBytes(32), 'standby', 'primary');
  await assert.rejects(
    connectHandshake(link, randomBytes(32), identity, 3000),
    (e: unknown) => isRubatoError(e) && /authentication|refused|failed/.test(e.message),
  );
  replicaIntact();
});

test('a wrong protocol version is refused', async () => {
  const s = await dial();
  const got: Buffer[] = [];
  s.on('data', (d) => got.push(d));
  await new Promise((r) => setTimeout(r, 100)); // the CHALLENGE
  const f = Buffer.alloc(HEADER_BYTES + 32);
  f.writeUInt32BE(f.length - 4, 0);
  f[4] = FrameType.HELLO;
  f[5] = 2; // a future protocol
  f.writeBigUInt64BE(1n, 16);
  createHmac('sha256', helloKeys(psk).p2s.key).update(f.subarray(0, HEADER_BYTES)).digest().copy(f, HEADER_BYTES);
  s.write(f);
  await new Promise<void>((r) => s.once('close', () => r()));
  replicaIntact();
});

test('truncated and corrupted checkpoint frames drop the session, replica untouched', async () => {
  for (const mode of ['truncated', 'corrupted', 'garbage-record'] as const) {
    const link = new Link(await dial(), psk, 'standby', 'primary');
    const welcome = await connectHandshake(link, psk, identity, 3000);
    assert.equal(welcome.replicaEpoch, 0);
    const payload = randomBytes(5000);
    if (mode === 'truncated') {
      link.sendPartial(FrameType.CKPT, 1, payload, 2000);
      link.socket.end();
    } else if (mode === 'corrupted') {
      const enc = (link as unknown as { enc: { encode(t: number, e: number, p: Buffer): Buffer } }).enc.encode(
        FrameType.CKPT,
        1,
        payload,
      );
      enc[100] = enc[100]! ^ 1;
      link.socket.write(enc);
    } else {
      await link.send(FrameType.CKPT, 1, payload); // authentic frame, but not a checkpoint record
    }
    const err = await Promise.race([
      closed(link),
      new Promise<Error>((r) => setTimeout(() => r(new Error('still open')), 3000)),
    ]);
    assert.notEqual(err.message, 'still open', `${mode}: the standby dropped the connection`);
    replicaIntact();
  }
});

test('before authentication: a 500 MiB length claim is refused at once, and nothing is buffered for it', async () => {
  const rssBefore = process.memoryUsage().rss;
  const socks = await Promise.all([0, 1, 2, 3].map(() => dial()));
  const t0 = Date.now();
  const closedAll = Promise.all(
    socks.map(
      (s) =>
        new Promise<void>((r) => {
          s.on('error', () => r());
          s.once('close', () => r());
        }),
    ),
  );
  for (const s of socks) {
    const head = Buffer.alloc(HEADER_BYTES);
    head.writeUInt32BE(500 << 20, 0);
    head[4] = FrameType.HELLO;
    head[5] = 2;
    s.write(head);
    s.write(randomBytes(1 << 20)); // the start of the stream behind the claim
  }
  await closedAll;
  assert.ok(Date.now() - t0 < 5000, `disconnected after ${Date.now() - t0} ms`);
  assert.ok(process.memoryUsage().rss - rssBefore < 100 << 20, 'no memory grew for the claims');
  replicaIntact();
});

test('silent connections are closed when their handshake times out, a flood beyond the cap at once; a real primary still connects', {
  timeout: 30_000,
}, async () => {
  const t0 = Date.now();
  // Each socket's close is watched from the moment it exists: the standby closes refused ones at once.
  const closedAt = await Promise.all(
    Array.from(
      { length: 300 },
      () =>
        new Promise<number>((r) => {
          const s = connect({ host: '127.0.0.1', port: standby.boundPort });
          s.on('error', () => {});
          s.resume(); // reads (and drops) the CHALLENGE, so the standby's close is seen here
          s.once('close', () => r(Date.now() - t0));
        }),
    ),
  );
  assert.ok(Math.max(...closedAt) < 15_000, `all closed within ${Math.max(...closedAt)} ms`);
  const link = new Link(await dial(), psk, 'standby', 'primary');
  const welcome = await connectHandshake(link, psk, identity, 3000);
  assert.equal(welcome.replicaEpoch, 0);
  link.close();
  replicaIntact();
});

test('the fencing token: after a primary with witness generation 5, one with an older generation or none is refused; a newer one is admitted', async () => {
  const session = async (generation?: number) => {
    const link = new Link(await dial(), psk, 'standby', 'primary');
    try {
      await connectHandshake(link, psk, { ...identity, ...(generation ? { generation } : {}) }, 3000);
      return 'admitted';
    } catch (e) {
      return (e as Error).message;
    } finally {
      link.close();
      await closed(link);
    }
  };
  assert.equal(await session(5), 'admitted');
  assert.match(await session(3), /stale generation 3 .* the witness is at 5/);
  assert.match(await session(), /fenced by the witness at generation 5/);
  assert.equal(await session(6), 'admitted');
  assert.match(await session(5), /stale generation 5 .* at 6/);
  replicaIntact();
});

test('a REJECT bound to this HELLO ends the primary with its reason; one replayed from another attempt only ends that attempt', async () => {
  // The real standby's refusal (a stale generation) carries the tag of this primary's nonce.
  const link = new Link(await dial(), psk, 'standby', 'primary');
  const bound = await connectHandshake(link, psk, { ...identity, generation: 1 }, 3000).then(
    () => null,
    (e: unknown) => e,
  );
  link.close();
  assert.ok(
    isRubatoError(bound, 'RUBATO_AUTH_FAILED') && /refused the connection: .*stale generation 1/.test(bound.message),
  );
  // A peer holding the key replays a REJECT that answered another HELLO: tagged for another nonce.
  const fake = createServer((sock) => {
    const l = new Link(sock, psk, 'primary', 'standby');
    void (async () => {
      await l.send(FrameType.CHALLENGE, 0, encodeChallenge(randomBytes(32)));
      await l.next(3000); // the HELLO
      const reason = Buffer.from('authentication failed');
      await l.send(FrameType.REJECT, 0, Buffer.concat([reason, rejectTag(psk, randomBytes(32), reason)]), {
        flushed: true,
      });
      l.close();
    })().catch(() => l.close());
  });
  await new Promise<void>((r) => fake.listen(0, '127.0.0.1', r));
  try {
    const port = (fake.address() as { port: number }).port;
    const sock = await new Promise<Socket>((resolve, reject) => {
      const c = connect({ host: '127.0.0.1', port }, () => resolve(c));
      c.once('error', reject);
    });
    const l2 = new Link(sock, psk, 'fake standby', 'primary');
    const replayed = await connectHandshake(l2, psk, identity, 3000).then(
      () => null,
      (e: unknown) => e,
    );
    l2.close();
    assert.ok(isRubatoError(replayed, 'RUBATO_PROTOCOL'), String(replayed));
    assert.match((replayed as Error).message, /not bound to this attempt/);
  } finally {
    fake.close();
  }
  replicaIntact();
});
