// The operator's HTTP endpoint of one controller: /metrics (Prometheus text), /status (the
// `rubato status` JSON), / (a live dashboard), /events (server-sent events feeding it: a sample of
// the controller's state every second, and failovers, protection changes as they happen). Read
// only, GET only, a bounded number of live dashboards; nothing it serves is secret beyond what
// `rubato status` shows (bind it to a management address).

import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { RubatoError, logger } from '../util/index.ts';
import type { ControllerMetrics } from './metrics.ts';
import { Sampler, NOTABLE_EVENTS, type Sample } from './samples.ts';

const log = logger('observe');
const MAX_STREAMS = 16;
const SAMPLE_MS = 1000;

type Snapshot = Record<string, unknown>;

export interface ObserveOptions {
  metrics: ControllerMetrics;
  status: () => Snapshot;
  /** What the page is about ("VM web1 on host a"). */
  title: string;
  /** Serve the dashboard and its event stream (--http); /metrics and /status are always served. */
  dashboard: boolean;
}

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

function asset(name: 'page' | 'uplot.js' | 'uplot.css'): Buffer {
  if (name === 'page') return readFileSync(join(here, 'dashboard.html'));
  const dist = dirname(require.resolve('uplot/dist/uPlot.iife.min.js'));
  return readFileSync(join(dist, name === 'uplot.js' ? 'uPlot.iife.min.js' : 'uPlot.min.css'));
}

export class ObserveServer {
  private readonly streams = new Set<ServerResponse>();
  private readonly sampler: Sampler;
  private timer: NodeJS.Timeout | null = null;
  private readonly assets = new Map<string, { body: Buffer; type: string }>();

  private constructor(
    private readonly server: Server,
    private readonly o: ObserveOptions,
  ) {
    this.sampler = new Sampler();
    if (o.dashboard) {
      this.assets.set('/', { body: asset('page'), type: 'text/html; charset=utf-8' });
      this.assets.set('/uplot.js', { body: asset('uplot.js'), type: 'text/javascript; charset=utf-8' });
      this.assets.set('/uplot.css', { body: asset('uplot.css'), type: 'text/css; charset=utf-8' });
      this.timer = setInterval(() => this.tick(), SAMPLE_MS);
      this.timer.unref();
      this.tick();
    }
  }

  /** Listens on `host:port` (port 0: any free one; see `url`). */
  static async start(listen: { host: string; port: number }, o: ObserveOptions): Promise<ObserveServer> {
    const server = createServer();
    const s = new ObserveServer(server, o);
    server.on('request', (req, res) => s.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) =>
        reject(
          new RubatoError(
            'RUBATO_CONFIG',
            `cannot serve metrics/dashboard on ${listen.host}:${listen.port}: ${e.message}`,
          ),
        ),
      );
      server.listen(listen.port, listen.host, () => resolve());
    });
    return s;
  }

  get url(): string {
    const a = this.server.address();
    if (!a || typeof a === 'string') return '';
    return `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`;
  }

  /** A controller event: counted in the metrics elsewhere; notable ones go to the dashboards. */
  event(e: { event: string } & Record<string, unknown>): void {
    if (!this.o.dashboard || !NOTABLE_EVENTS.has(e.event)) return;
    const ev = this.sampler.event(Date.now(), e);
    this.broadcast('event', ev);
  }

  private tick(): void {
    let s: Snapshot;
    try {
      s = this.o.status();
    } catch (e) {
      log.debug(`status for the dashboard: ${String(e)}`);
      return;
    }
    const sample: Sample = this.sampler.sample(Date.now(), s);
    this.broadcast('sample', sample);
  }

  private broadcast(kind: string, data: unknown): void {
    const msg = `event: ${kind}\ndata: ${JSON.stringify(data)}\n\n`;
    for (const res of this.streams) res.write(msg);
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? '/').split('?')[0]!;
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET' }).end();
      return;
    }
    if (path === '/metrics') {
      this.o.metrics.text().then(
        (t) => {
          res.writeHead(200, { 'content-type': this.o.metrics.contentType }).end(t);
        },
        (e: unknown) => {
          res.writeHead(500).end(String(e));
        },
      );
      return;
    }
    if (path === '/status') {
      let body: string;
      try {
        body = JSON.stringify(this.o.status());
      } catch (e) {
        res.writeHead(500).end(String(e));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(body);
      return;
    }
    if (path === '/events' && this.o.dashboard) {
      this.stream(req, res);
      return;
    }
    const a = this.assets.get(path);
    if (a) {
      res.writeHead(200, { 'content-type': a.type, 'cache-control': 'no-cache' }).end(a.body);
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
  }

  private stream(req: IncomingMessage, res: ServerResponse): void {
    if (this.streams.size >= MAX_STREAMS) {
      res.writeHead(503, { 'content-type': 'text/plain' }).end(`at most ${MAX_STREAMS} live dashboards\n`);
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    // What happened before this page opened: the last minutes of samples and events.
    res.write(`event: hello\ndata: ${JSON.stringify({ title: this.o.title, ...this.sampler.history() })}\n\n`);
    this.streams.add(res);
    req.on('close', () => this.streams.delete(res));
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const res of this.streams) res.end();
    this.streams.clear();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
