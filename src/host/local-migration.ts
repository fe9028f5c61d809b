// A live migration between two QEMUs on this host, over a unix socket: the destination (started
// paused with `-incoming defer`) runs the guest the moment its copy is complete. What adoption and
// release move a running guest with. The guest's downtime is the gap between the source's STOP and
// the destination's RESUME (QMP events, one host clock).

import { RubatoError, logger, sleep } from '../util/index.ts';
import type { QmpClient, QmpEvent } from '../qemu/index.ts';

const log = logger('migrate');

export interface LocalMigration {
  /** From the source's STOP to the destination's RESUME. */
  downtimeMs: number;
  /** QEMU's own figures (source side). */
  qemuDowntimeMs: number;
  totalMs: number;
  transferredBytes: number;
}

const stamp = (e: QmpEvent) =>
  e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : Date.now();

/**
 * Moves the running guest from `from` to `to` (started with `-incoming defer`, paused) over unix
 * socket `uri`, and runs it there. A failed migration leaves the guest running in `from`.
 */
export async function migrateLocal(
  from: QmpClient,
  to: QmpClient,
  socketPath: string,
  what: string,
  timeoutMs = 300_000,
): Promise<LocalMigration> {
  const uri = `unix:${socketPath}`;
  // The source stops the guest (STOP) when the copy ends; the destination says when its copy is
  // complete (MIGRATION events) and runs the guest at once (it was started paused): its RESUME ends
  // the downtime. Polling its state covers an event that did not come. (No timer outlives the call.)
  let stoppedAt: number | null = null;
  let resumedAt: number | null = null;
  let resumeAsked = false;
  const resume = () => {
    if (resumeAsked) return;
    resumeAsked = true;
    void to.execute('cont').catch(() => {});
  };
  const onSource = (e: QmpEvent) => {
    if (e.event === 'STOP') stoppedAt ??= stamp(e);
  };
  const onDestination = (e: QmpEvent) => {
    if (e.event === 'MIGRATION' && e.data?.['status'] === 'completed') resume();
    if (e.event === 'RESUME') resumedAt ??= stamp(e);
  };
  await to.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  from.on('event', onSource);
  to.on('event', onDestination);
  try {
    await to.execute('migrate-incoming', { uri });
    await from.execute('migrate', { uri });
    const until = Date.now() + timeoutMs;
    let last = 0;
    for (;;) {
      const st = (await from.execute('query-migrate')) as Record<string, unknown>;
      const status = String(st['status'] ?? 'none');
      if (status === 'completed') {
        const waitUntil = Date.now() + 5000;
        while (resumedAt === null && Date.now() < waitUntil) {
          if (!resumeAsked) {
            const dst = (await to.execute('query-migrate')) as Record<string, unknown>;
            if (dst['status'] === 'completed') resume();
            else if (dst['status'] === 'failed')
              throw new RubatoError('RUBATO_MIGRATION', `${what}: the destination failed to load the guest`);
          }
          await sleep(10);
        }
        const ram = (st['ram'] ?? {}) as Record<string, number>;
        return {
          downtimeMs: Math.round((resumedAt ?? Date.now()) - (stoppedAt ?? Date.now())),
          qemuDowntimeMs: Number(st['downtime'] ?? -1),
          totalMs: Number(st['total-time'] ?? -1),
          transferredBytes: ram['transferred'] ?? 0,
        };
      }
      if (status === 'failed' || status === 'cancelled')
        throw new RubatoError(
          'RUBATO_MIGRATION',
          `${what}: the migration ${status}: ${String(st['error-desc'] ?? '')}`,
        );
      if (Date.now() > until) {
        await from.execute('migrate_cancel').catch(() => {});
        throw new RubatoError('RUBATO_MIGRATION', `${what}: not done within ${timeoutMs / 1000} s (cancelled)`);
      }
      if (Date.now() - last > 2000) {
        const ram = (st['ram'] ?? {}) as Record<string, number>;
        log.info(`${what}: ${status}, ${Math.round((ram['transferred'] ?? 0) / 2 ** 20)} MiB sent`);
        last = Date.now();
      }
      await sleep(20);
    }
  } finally {
    from.off('event', onSource);
    to.off('event', onDestination);
  }
}
