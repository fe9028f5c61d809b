// `npx tsx scripts/pause-timeline.ts [--mem MB] [--checkpoints N] [--verbose]`: where a checkpoint's
// pause goes inside QEMU. Boots the test guest (dirtier, 1 page/ms) under Rubato's QEMU with
// `-msg timestamp=on`, takes checkpoints 25 ms apart through ColoCapture, and turns on QEMU's trace
// events (log backend, on stderr) for COLO's messages, the device sections and the RAM section.
// Prints the median of each stretch of the pause and one pause's timeline. Tracing costs a few µs
// per event: the traced pause is longer than an untraced one.

import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ColoCapture } from '../src/capture/index.ts';
import { QemuVm, guestAppend } from '../src/qemu/index.ts';
import { makeTempDir, removeTempDir, sleep } from '../src/util/index.ts';
import { testPlatform } from '../test/helpers/platform.ts';

const { values } = parseArgs({
  options: {
    mem: { type: 'string', default: '256' },
    checkpoints: { type: 'string', default: '60' },
    verbose: { type: 'boolean', default: false },
  },
});
const memMb = Number(values.mem);
const count = Number(values.checkpoints);
if (!Number.isInteger(memMb) || memMb < 64 || !Number.isInteger(count) || count < 1) {
  console.error('pause-timeline: --mem needs whole MB ≥ 64 and --checkpoints a count ≥ 1');
  process.exit(2);
}

const EVENTS = [
  'colo_vm_state_change',
  'colo_send_message',
  'colo_receive_message',
  'vmstate_save',
  'savevm_section_*',
];
if (values.verbose) EVENTS.push('ram_save_page', 'migration_bitmap_sync_*');

const { accel, binary: real, guest } = await testPlatform();
const dir = makeTempDir();
// `-msg timestamp=on` makes the log backend prefix each event with pid@seconds.microseconds
const wrapper = join(dir, 'qemu-timestamped');
writeFileSync(wrapper, `#!/bin/sh\nexec '${real.path}' -msg timestamp=on "$@"\n`);
chmodSync(wrapper, 0o700);
let vm: QemuVm | null = null;
try {
  vm = await QemuVm.start(
    {
      name: 'timeline',
      accel,
      cpus: 1,
      memMb,
      ramFile: join(dir, 'ram'),
      kernel: guest.kernel,
      initrd: guest.initrd,
      append: guestAppend(['dirtier', 1, 16]),
    },
    { binary: { ...real, path: wrapper }, runDir: dir },
  );
  const lines: string[] = [];
  let partial = '';
  vm.proc.child.stderr?.on('data', (d: Buffer) => {
    const parts = (partial + d.toString()).split('\n');
    partial = parts.pop() ?? '';
    lines.push(...parts);
  });
  await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
  const { capture } = await ColoCapture.start(vm, { runDir: dir });
  for (let i = 0; i < 5; i++) await capture.checkpoint();
  for (const name of EVENTS) await vm.qmp.execute('trace-event-set-state', { name, enable: true });
  for (let i = 0; i < count; i++) {
    await sleep(25);
    await capture.checkpoint();
  }
  await capture.close();
  report(lines, Math.floor(count / 2));
} finally {
  await vm?.stop();
  removeTempDir(dir);
}

interface Ev {
  ms: number;
  name: string;
  args: string;
}

function report(raw: readonly string[], shown: number): void {
  const events: Ev[] = [];
  for (const l of raw) {
    const m = l.match(/^\d+@(\d+)\.(\d+):(\S+) (.*)$/);
    if (m) events.push({ ms: Number(m[1]) * 1e3 + Number(m[2]) / 1e3, name: m[3]!, args: m[4]! });
  }
  // One pause: from run→stop to stop→run. Stretches between the marks that every pause has.
  const stretches = new Map<string, number[]>();
  const add = (k: string, v: number) => stretches.set(k, [...(stretches.get(k) ?? []), v]);
  let pause: Ev[] | null = null;
  let n = 0;
  for (const e of events) {
    if (e.name === 'colo_vm_state_change' && /'run' => 'stop'/.test(e.args)) pause = [e];
    else if (pause) {
      pause.push(e);
      if (e.name === 'colo_vm_state_change' && /'stop' => 'run'/.test(e.args)) {
        summarise(pause, add);
        if (++n === shown) printTimeline(pause);
        pause = null;
      }
    }
  }
  const med = (v: number[]) => [...v].sort((a, b) => a - b)[v.length >> 1]!;
  console.log(`\nmedians over ${n} pauses (guest of ${memMb} MB, about 25 dirty pages each):`);
  for (const [k, v] of stretches) console.log(`${med(v).toFixed(3).padStart(8)} ms  ${k}`);
}

function summarise(p: readonly Ev[], add: (k: string, v: number) => void): void {
  const at = (pred: (e: Ev) => boolean) => p.find(pred)?.ms;
  const t0 = p[0]!.ms;
  const firstDevice = at((e) => e.name === 'vmstate_save');
  const ramStart = at((e) => e.name === 'savevm_section_start' && e.args.startsWith('ram'));
  const ramEnd = at((e) => e.name === 'savevm_section_end' && e.args.startsWith('ram'));
  const received = at((e) => e.name === 'colo_receive_message' && e.args.includes('vmstate-received'));
  const end = p.at(-1)!.ms;
  if ([firstDevice, ramStart, ramEnd, received].some((x) => x === undefined)) return;
  add('whole pause (stop → run)', end - t0);
  add('stop → first device section', firstDevice! - t0);
  add(`device sections (${p.filter((e) => e.name === 'vmstate_save').length})`, ramStart! - firstDevice!);
  add('RAM section (dirty-log sync, pages, until the stream is flushed to Rubato)', ramEnd! - ramStart!);
  add("RAM end → Rubato's vmstate-received (device state sent and read)", received! - ramEnd!);
  add('vmstate-received → run (vmstate-loaded, vm_start)', end - received!);
}

function printTimeline(p: readonly Ev[]): void {
  console.log('one pause (ms from the stop, + since the previous event):');
  let prev = p[0]!.ms;
  for (const e of p) {
    console.log(
      `${(e.ms - p[0]!.ms).toFixed(3).padStart(7)} +${(e.ms - prev).toFixed(3).padStart(6)}  ${e.name} ${e.args.slice(0, 60)}`,
    );
    prev = e.ms;
  }
}
