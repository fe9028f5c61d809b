// The link encrypts a frame only as its socket drains: a large checkpoint behind a reader that stopped does
// not sit in the socket as ciphertext, and frames queued behind it (heartbeats, pre-sends) keep their order.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Socket } from 'node:net';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import { Link } from '../../src/replication/link.ts';
import { FrameType, sessionKeys, type Frame } from '../../src/replication/protocol/frame.ts';

async function pair(): Promise<{ a: Socket; b: Socket; close: () => void }> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  const accepted = once(server, 'connection');
  const a = connect(port, '127.0.0.1');
  const [b] = (await accepted) as [Socket];
  await once(a, 'connect').catch(() => {});
  return { a, b, close: () => server.close() };
}

/** A keyed pair of links over loopback, the standby's reader stopped. */
async function links(): Promise<{ a: Socket; primary: Link; standby: Link; close: () => void }> {
  const { a, b, close } = await pair();
  const psk = randomBytes(32);
  const keys = sessionKeys(psk, randomBytes(16), randomBytes(16));
  const primary = new Link(a, psk, 'standby', 'primary');
  const standby = new Link(b, psk, 'primary', 'standby');
  primary.setSendKey(keys.p2s);
  standby.setReceiveKey(keys.p2s);
  standby.setMaxFrameBytes(64 << 20);
  primary.setReceiveKey(keys.s2p);
  standby.setSendKey(keys.s2p);
  standby.pauseReading();
  return { a, primary, standby, close };
}

test('a 32 MiB frame behind a stopped reader: at most about 1 MiB of it is encrypted ahead; all frames arrive in order', async () => {
  const { a, primary, standby, close } = await links();
  const frames: Frame[] = [];
  standby.on('frame', (f: Frame) => frames.push(f));
  standby.startEvents();

  const big = randomBytes(32 << 20);
  const sentBig = primary.sendParts(FrameType.CKPT, 1, {
    parts: [big.subarray(0, 1000), big.subarray(1000)],
    length: big.length,
  });
  const small = [randomBytes(100), randomBytes(300_000), randomBytes(7)];
  const sentSmall = small.map((p, i) => primary.send(FrameType.PRESEND, 2 + i, p));
  let settled = false;
  void Promise.all([sentBig, ...sentSmall]).then(() => (settled = true));
  await new Promise((r) => setTimeout(r, 300));
  // The kernel's buffers took what they could; the socket holds at most the pump's bound and a slice.
  assert.ok(a.writableLength <= (1 << 20) + (64 << 10), `${a.writableLength} bytes wait in the socket`);
  assert.ok(primary.stats.bytesSent < 24 << 20, `only ${primary.stats.bytesSent} bytes were encrypted so far`);
  assert.equal(settled, false, 'the sends wait for the reader');

  standby.resumeReading();
  await Promise.all([sentBig, ...sentSmall]);
  const last = primary.sendLast(FrameType.BYE);
  await last;
  const until = Date.now() + 10_000;
  while (frames.length < 5 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(
    frames.map((f) => [f.type, f.epoch, f.seq]),
    [
      [FrameType.CKPT, 1, 1],
      [FrameType.PRESEND, 2, 2],
      [FrameType.PRESEND, 3, 3],
      [FrameType.PRESEND, 4, 4],
      [FrameType.BYE, 0, 5],
    ],
  );
  assert.ok(frames[0]!.payload.equals(big), 'the large frame arrives intact');
  for (const [i, p] of small.entries()) assert.ok(frames[i + 1]!.payload.equals(p), `frame ${i + 2} intact`);
  primary.close();
  standby.close();
  close();
});

test('frames queued when the link closes are refused, not left pending', async () => {
  const { primary, standby, close } = await links();
  const big = randomBytes(16 << 20);
  const sends = [
    primary.sendParts(FrameType.CKPT, 1, { parts: [big], length: big.length }),
    primary.send(FrameType.PRESEND, 2, randomBytes(10)),
  ];
  await new Promise((r) => setTimeout(r, 100));
  primary.close();
  const results = await Promise.allSettled(sends);
  assert.deepEqual(
    results.map((r) => r.status),
    ['rejected', 'rejected'],
  );
  await assert.rejects(primary.send(FrameType.PRESEND, 3, randomBytes(10)));
  standby.close();
  close();
});
