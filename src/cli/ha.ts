// `rubato primary`, `rubato standby`, `rubato failover`, `rubato status`: the controllers as
// long-running commands. With --events each prints one JSON object per event on stdout.

import { connect } from 'node:net';
import { join, resolve } from 'node:path';
import { mkdirSync } from 'node:fs';
import { RubatoError } from '../util/errors.ts';
import { logger } from '../util/log.ts';
import { QemuVm } from '../qemu/vm.ts';
import { guestAppend, VmSpecSchema, type Accel } from '../qemu/spec.ts';
import { ensureGuestImage, ensurePatchedQemu, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice } from '../qemu/accel.ts';
import { PrimaryController } from '../replication/primary.ts';
import { StandbyController } from '../replication/standby.ts';
import { loadKeyFile } from './keyfile.ts';
import { parsePolicy } from '../scheduler/index.ts';

const log = logger('rubato');

export function parseHostPort(v: string, what: string): { host: string; port: number } {
  const m = v.match(/^(.+):(\d{1,5})$/);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new RubatoError('RUBATO_CONFIG', `${what} must be HOST:PORT (got "${v}")`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}

function eventPrinter(enabled: boolean) {
  return (e: object) => { if (enabled) process.stdout.write(`${JSON.stringify({ t: Date.now(), ...e })}\n`); };
}

async function binaryFor(accel: Accel) { return accel === 'tcg' ? ensurePatchedQemu() : stockQemu(); }

export interface PrimaryCliOptions {
  standby: string; key: string; name: string; mem: number; cpus: number; workload: string; accel: AccelChoice;
  kernel?: string; initrd?: string; append?: string; policy: string; heartbeatMs: number; timeoutMs: number; stateDir: string; events: boolean;
}

export async function runPrimary(o: PrimaryCliOptions): Promise<void> {
  const standby = parseHostPort(o.standby, '--standby');
  const psk = loadKeyFile(o.key);
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(o.accel, stockQemu(), guest);
  const binary = await binaryFor(accel);
  const stateDir = resolve(o.stateDir);
  mkdirSync(stateDir, { recursive: true });
  const parsed = VmSpecSchema.safeParse({
    name: o.name, accel, cpus: o.cpus, memMb: o.mem, kernel: o.kernel ?? guest.kernel, initrd: o.initrd ?? guest.initrd,
    append: o.append ?? guestAppend(o.workload.split(',')),
  });
  if (!parsed.success) throw new RubatoError('RUBATO_CONFIG', `VM: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const emit = eventPrinter(o.events);
  const vm = await QemuVm.start(parsed.data, { binary, runDir: stateDir });
  emit({ event: 'started', vm: o.name, qemuPid: vm.pid, controllerPid: process.pid, accel });
  const primary = new PrimaryController({
    vm, runDir: stateDir, standby, psk, periodMs: 25, policy: parsePolicy(o.policy), heartbeatMs: o.heartbeatMs, timeoutMs: o.timeoutMs, retryMs: 1000,
    onEvent: (e) => {
      emit(e);
      if (!o.events && e.event === 'status') log.info(`${o.policy} | epoch ${e.epoch} acked ${e.ackedEpoch} | ${e.ckptPerSec} ckpt/s | ${e.dirtyPages} dirty pages | pause ${e.pauseMs} ms | ${e.mbPerSec} MB/s | lag ${e.lagMs} ms`);
    },
  });
  primary.start();
  const stop = async () => { await primary.stop(); await vm.stop(); process.exit(0); };
  process.once('SIGTERM', () => void stop());
  process.once('SIGINT', () => void stop());
  await new Promise<void>((r) => vm.once('exit', () => r()));
  log.warn(`guest ${o.name} exited; primary controller stops`);
  await primary.stop();
}

export interface StandbyCliOptions { listen: string; stateDir: string; key: string; heartbeatMs: number; timeoutMs: number; autoFailover: boolean; events: boolean; fsync: boolean }

export async function runStandby(o: StandbyCliOptions): Promise<void> {
  const listen = parseHostPort(o.listen, '--listen');
  const psk = loadKeyFile(o.key);
  const emit = eventPrinter(o.events);
  const standby = new StandbyController({
    ...listen, stateDir: resolve(o.stateDir), psk, heartbeatMs: o.heartbeatMs, timeoutMs: o.timeoutMs, binaryFor,
    autoFailover: o.autoFailover, fsync: o.fsync,
    onEvent: (e) => {
      emit(e);
      if (!o.events && e.event === 'failover') log.warn(`guest running here from checkpoint ${e.epoch}: restore ${e.restoreMs} ms (${e.why})`);
    },
  });
  await standby.start();
  emit({ event: 'started', controllerPid: process.pid });
  await new Promise<void>((r) => {
    const stop = () => r();
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
  await standby.stop();
}

/** Sends one command to a standby's control socket. */
export async function controlCommand(stateDir: string, cmd: 'failover' | 'status'): Promise<Record<string, unknown>> {
  const path = join(resolve(stateDir), 'control.sock');
  return new Promise((resolveP, reject) => {
    const s = connect(path);
    let buf = '';
    s.setEncoding('utf8');
    s.on('data', (d: string) => { buf += d; });
    s.on('end', () => { try { resolveP(JSON.parse(buf) as Record<string, unknown>); } catch { reject(new RubatoError('RUBATO_CONFIG', `bad answer from ${path}`)); } });
    s.on('error', (e) => reject(new RubatoError('RUBATO_CONFIG', `no standby controller at ${path}: ${e.message}`)));
    s.write(`${cmd}\n`);
  });
}
