// `rubato bench nbd`: the guest disk's path through Rubato's NBD server against the same raw file
// read and written directly, with stock `qemu-img bench` (4 KiB requests at queue depth 16),
// interleaved: raw, NBD, raw, NBD. Reports IOPS and the NBD/raw ratio per direction.

import { mkdirSync, writeFileSync, openSync, ftruncateSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, runCommand, RubatoError, median, round } from '../util/index.ts';
import { NbdServer } from '../io/index.ts';

export interface NbdBenchOptions {
  quick: boolean;
  outDir: string;
  onStatus?: (s: string) => void;
}

const IMAGE_BYTES = 1 << 30;

/** IOPS of one qemu-img bench run (it prints "Run completed in S seconds."). */
async function qemuImgBench(target: string[], write: boolean, count: number): Promise<number> {
  const args = [
    'bench',
    '-c',
    String(count),
    '-d',
    '16',
    '-s',
    '4096',
    '-S',
    String(4096 * 257),
    ...(write ? ['-w'] : []),
    ...target,
  ];
  const r = await runCommand('qemu-img', args);
  const m = r.stdout.match(/Run completed in ([\d.]+) seconds/);
  if (r.code !== 0 || !m)
    throw new RubatoError(
      'RUBATO_SETUP_FAILED',
      `qemu-img ${args.join(' ')} failed: ${(r.stderr || r.stdout).trim().split('\n').slice(-2).join(' | ')}`,
    );
  return count / Number(m[1]);
}

export async function runNbdBench(o: NbdBenchOptions): Promise<{ summary: Record<string, unknown>; file: string }> {
  const status = o.onStatus ?? (() => {});
  const dir = makeTempDir('rubato-nbdbench-');
  const img = join(dir, 'disk.raw');
  const fd = openSync(img, 'w');
  ftruncateSync(fd, IMAGE_BYTES);
  closeSync(fd);
  const server = new NbdServer(img, join(dir, 'disk.nbd'));
  const count = o.quick ? 20_000 : 100_000;
  const rounds = o.quick ? 1 : 2;
  const result: Record<string, { rawIops: number[]; nbdIops: number[] }> = {
    read: { rawIops: [], nbdIops: [] },
    write: { rawIops: [], nbdIops: [] },
  };
  try {
    await server.start();
    const nbd = ['-f', 'raw', `nbd+unix:///disk?socket=${server.socketPath}`];
    const raw = ['-f', 'raw', img];
    for (let i = 0; i < rounds; i++) {
      for (const dirn of ['write', 'read'] as const) {
        const w = dirn === 'write';
        const a = await qemuImgBench(raw, w, count);
        const b = await qemuImgBench(nbd, w, count);
        server.cutEpoch(); // a checkpoint would take the epoch's dirty pages; keep the set bounded
        result[dirn]!.rawIops.push(a);
        result[dirn]!.nbdIops.push(b);
        status(
          `${dirn}: raw ${Math.round(a)} IOPS, through Rubato's NBD server ${Math.round(b)} IOPS (${round(b / a, 3)}×)`,
        );
      }
    }
  } finally {
    await server.close();
    removeTempDir(dir);
  }
  const per = (k: 'read' | 'write') => {
    const rawIops = median(result[k]!.rawIops);
    const nbdIops = median(result[k]!.nbdIops);
    return { rawIops: Math.round(rawIops), nbdIops: Math.round(nbdIops), ratio: round(nbdIops / rawIops, 3) };
  };
  const summary = {
    benchmark: 'nbd',
    requestBytes: 4096,
    queueDepth: 16,
    count,
    read: per('read'),
    write: per('write'),
  };
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'nbd-bench.json');
  writeFileSync(file, JSON.stringify({ ...summary, runs: result }, null, 1));
  return { summary: { ...summary, results: file }, file };
}
