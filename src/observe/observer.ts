// What `--metrics HOST:PORT` and `--http HOST:PORT` start for a controller: its metrics, fed by its
// events, served on one address (with the dashboard when --http names it) or on two.

import { ControllerMetrics, type MetricsSource } from './metrics.ts';
import { ObserveServer } from './server.ts';
import { logger } from '../util/index.ts';

export { ControllerMetrics } from './metrics.ts';
export { ObserveServer } from './server.ts';

const log = logger('observe');

type HostPort = { host: string; port: number };
type AnyEvent = { event: string } & Record<string, unknown>;

export interface Observer {
  /** Every event the controller emits goes through here. */
  event(e: object): void;
  /** Where each endpoint listens (port 0 resolved). */
  urls: { metrics: string | null; dashboard: string | null };
  close(): Promise<void>;
}

export interface ObserveSetup {
  metrics?: HostPort | undefined;
  http?: HostPort | undefined;
  role: string;
  vm: string | null;
  title: string;
  status: () => Record<string, unknown>;
}

const same = (a: HostPort, b: HostPort) => a.host === b.host && a.port === b.port && a.port !== 0;

/** Starts the endpoints asked for (none: an observer that does nothing). */
export async function startObserver(o: ObserveSetup): Promise<Observer> {
  if (!o.metrics && !o.http)
    return { event: () => {}, urls: { metrics: null, dashboard: null }, close: async () => {} };
  const metrics = new ControllerMetrics();
  const source = metrics.addSource({ vm: o.vm ?? '', role: o.role }, o.status);
  const servers: ObserveServer[] = [];
  let dash: ObserveServer | null = null;
  let prom: ObserveServer | null = null;
  try {
    if (o.http)
      servers.push(
        (dash = await ObserveServer.start(o.http, { metrics, status: o.status, title: o.title, dashboard: true })),
      );
    if (o.metrics && !(o.http && same(o.metrics, o.http)))
      servers.push(
        (prom = await ObserveServer.start(o.metrics, { metrics, status: o.status, title: o.title, dashboard: false })),
      );
    else if (o.metrics) prom = dash;
  } catch (e) {
    for (const s of servers) await s.close();
    throw e;
  }
  const urls = { metrics: prom ? `${prom.url}/metrics` : null, dashboard: dash ? `${dash.url}/` : null };
  if (urls.metrics) log.info(`metrics on ${urls.metrics}`);
  if (urls.dashboard) log.info(`dashboard on ${urls.dashboard}`);
  return {
    urls,
    event: (e) => {
      const ev = e as AnyEvent;
      if (typeof ev.event !== 'string') return;
      source.observe(ev);
      dash?.event(ev);
    },
    close: async () => {
      for (const s of servers) await s.close();
    },
  };
}

/**
 * The agent's view: the VM processes it runs, each a source labelled with its VM and role, fed by
 * the events they print; their gauges come from each one's last status event.
 */
export class AgentMetrics {
  readonly metrics: ControllerMetrics;
  private readonly perVm = new Map<string, { src: MetricsSource; last: Record<string, unknown> }>();

  constructor(host: string) {
    this.metrics = new ControllerMetrics({ host });
  }

  event(e: object): void {
    const ev = e as AnyEvent & { vm?: unknown; role?: unknown };
    if (typeof ev.event !== 'string' || typeof ev.vm !== 'string' || (ev.role !== 'primary' && ev.role !== 'standby'))
      return;
    const key = `${ev.vm}/${ev.role}`;
    let x = this.perVm.get(key);
    if (!x) {
      const last: Record<string, unknown> = { role: ev.role };
      x = { src: this.metrics.addSource({ vm: ev.vm, role: ev.role }, () => last), last };
      this.perVm.set(key, x);
    }
    if (ev.event === 'status')
      Object.assign(x.last, ev, {
        role: x.last['role'] === 'standby' && ev['epoch'] !== undefined ? 'primary' : x.last['role'],
      });
    if (ev.event === 'protecting' || ev.event === 'reprotected') x.last['protected'] = true;
    if (ev.event === 'unprotected') x.last['protected'] = false;
    if (ev.event === 'session') x.last['primary'] = ev['peer'];
    if (ev.event === 'primary-lost') x.last['primary'] = null;
    if (ev.event === 'committed') x.last['replicaEpoch'] = ev['epoch'];
    x.src.observe(ev);
  }
}
