// Rubato's NBD server against a stock client (qemu-io from Debian) and against garbage.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runCommand } from '../../src/util/procs.ts';
import { connect, type Socket } from 'node:net';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer } from '../../src/io/disk/nbd-server.ts';
import { ensurePackages } from '../../src/setup/setup.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';

async function withServer(fn: (s: NbdServer, dir: string) => Promise<void>) {
  await ensurePackages();
  const dir = makeTempDir('rubato-nbd-');
  writeFileSync(join(dir, 'disk.img'), Buffer.alloc(8 << 20));
  const s = new NbdServer(join(dir, 'disk.img'), join(dir, 'nbd.sock'));
  await s.start();
  try {
    await fn(s, dir);
  } finally {
    await s.close();
    removeTempDir(dir);
  }
}

test('qemu-io reads and writes through the server; writes mark their pages dirty', async () => {
  await withServer(async (s, dir) => {
    const url = `nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`;
    // the server lives in this process: the client must run asynchronously
    const r = await runCommand('qemu-io', [
      '-f',
      'raw',
      url,
      '-c',
      'write -P 0xab 4096 8192',
      '-c',
      'read -P 0xab 4096 8192',
      '-c',
      'write -z 65536 4096',
      '-c',
      'flush',
    ]);
    assert.equal(r.code, 0, r.stderr + r.stdout);
    assert.doesNotMatch(r.stdout, /Pattern verification failed/);
    const img = readFileSync(join(dir, 'disk.img'));
    assert.equal(img[4096], 0xab);
    assert.equal(img[4096 + 8191], 0xab);
    assert.equal(img[4095], 0);
    const e = s.cutEpoch();
    assert.deepEqual(
      [...e.pages.keys()].sort((a, b) => a - b),
      [4096, 8192, 65536],
    );
    assert.equal(e.pages.get(4096)![0], 0xab);
    assert.ok(e.flushes >= 1);
    assert.equal(s.cutEpoch().pages.size, 0, 'a cut starts a fresh epoch');
    // A discarding cut (before a full copy of the image, or unprotected) drops the logged writes
    // and hands over nothing; it counts them and starts a fresh epoch all the same.
    const w = await runCommand('qemu-io', ['-f', 'raw', url, '-c', 'write -P 0xcd 0 8192']);
    assert.equal(w.code, 0, w.stderr + w.stdout);
    const d = s.cutEpoch(true);
    assert.equal(d.pages.size, 0);
    assert.ok(d.writes >= 1);
    const x = await runCommand('qemu-io', ['-f', 'raw', url, '-c', 'write -P 0xef 12288 4096']);
    assert.equal(x.code, 0, x.stderr + x.stdout);
    assert.deepEqual([...s.cutEpoch().pages.keys()], [12288], 'logged again after a discarding cut');

    // The primary's cut: marked at the pause without waiting for the server's thread, collected
    // later. A write after the mark is the next epoch's even though it came before the collection;
    // the counters read zero for the new epoch until it has I/O.
    const before = await runCommand('qemu-io', ['-f', 'raw', url, '-c', 'write -P 0x11 16384 4096']);
    assert.equal(before.code, 0, before.stderr + before.stdout);
    // (the server's thread publishes its counters after its reply: give it the turn)
    for (let i = 0; i < 500 && s.epochStats.writes === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(s.epochStats.writes >= 1, 'the running epoch counts its write');
    const first = s.cut();
    assert.equal(s.epochStats.writes, 0, 'a marked cut starts the counters afresh at once');
    const after = await runCommand('qemu-io', ['-f', 'raw', url, '-c', 'write -P 0x22 20480 4096']);
    assert.equal(after.code, 0, after.stderr + after.stdout);
    const second = s.cut();
    const empty = s.cut(); // no request between two marks: an empty epoch
    const e1 = await first.collect();
    assert.deepEqual([...e1.pages.keys()], [16384]);
    assert.equal(e1.pages.get(16384)![0], 0x11);
    const e2 = await second.collect();
    assert.deepEqual([...e2.pages.keys()], [20480], "the write after the mark is the next cut's");
    assert.equal(e2.pages.get(20480)![0], 0x22);
    assert.equal((await empty.collect()).pages.size, 0);
  });
});

function handshake(sock: Socket): Promise<void> {
  return new Promise((resolve) => {
    let got = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= 18 && got.length < 100) {
        if (got.length === 18) {
          const b = Buffer.alloc(4 + 16 + 4);
          b.writeUInt32BE(3, 0); // fixed newstyle + no zeroes
          b.writeBigUInt64BE(0x49484156454f5054n, 4);
          b.writeUInt32BE(1, 12); // EXPORT_NAME
          b.writeUInt32BE(4, 16);
          sock.write(Buffer.concat([b.subarray(0, 20), Buffer.from('disk')]));
        } else if (got.length >= 28) {
          sock.off('data', onData);
          resolve();
        }
      }
    };
    sock.on('data', onData);
  });
}

function request(type: number, offset: bigint, length: number, magic = 0x25609513): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(magic, 0);
  b.writeUInt16BE(type, 6);
  b.write('handle01', 8);
  b.writeBigUInt64BE(offset, 16);
  b.writeUInt32BE(length, 24);
  return b;
}

const reply = (sock: Socket) => new Promise<Buffer>((r) => sock.once('data', r));

test('malformed requests get NBD error replies, never a crash', async () => {
  await withServer(async (s, dir) => {
    const sock = connect(join(dir, 'nbd.sock'));
    await handshake(sock);
    sock.write(request(0, 8n << 20n, 4096)); // read past the end
    let r = await reply(sock);
    assert.equal(r.readUInt32BE(4), 22, 'EINVAL');
    sock.write(request(77, 0n, 0)); // unknown command
    r = await reply(sock);
    assert.equal(r.readUInt32BE(4), 22);
    sock.write(request(0, 0n, 512)); // still usable
    r = await reply(sock);
    assert.equal(r.readUInt32BE(4), 0);
    sock.write(request(0, 0n, 0, 0xdeadbeef)); // garbage magic: error reply, then hang up
    const closed = new Promise<void>((res) => sock.once('close', () => res()));
    r = await reply(sock);
    assert.equal(r.readUInt32BE(4), 22);
    await closed;
    assert.ok(s.cutEpoch().errors >= 3);
  });
});
