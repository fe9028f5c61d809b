// The standby's local control socket, used by `rubato failover` and `rubato status`: one command
// line in, one JSON line out. It lives in the state folder; access is the folder's permissions.

import { connect, createServer, type Server } from 'node:net';
import { join, resolve } from 'node:path';
import { chmodSync, rmSync } from 'node:fs';
import { RubatoError, errorMessage, logger } from '../util/index.ts';

const log = logger('control');
const MAX_COMMAND_BYTES = 256;

export type ControlHandlers = Record<string, () => Promise<unknown> | unknown>;

export class ControlSocket {
  private server: Server | null = null;

  constructor(
    readonly path: string,
    private readonly handlers: ControlHandlers,
  ) {}

  async start(): Promise<void> {
    rmSync(this.path, { force: true });
    this.server = createServer((s) => {
      s.setEncoding('utf8');
      let buf = '';
      const reply = (v: unknown) => s.end(`${JSON.stringify(v)}\n`);
      s.on('data', (d: string) => {
        buf += d;
        if (buf.length > MAX_COMMAND_BYTES) {
          reply({ ok: false, error: 'command too long' });
          return;
        }
        if (!buf.includes('\n')) return;
        const cmd = buf.trim();
        const h = this.handlers[cmd];
        if (!h) {
          reply({ ok: false, error: `unknown command ${cmd}` });
          return;
        }
        Promise.resolve()
          .then(h)
          .then(reply, (e: unknown) => reply({ ok: false, error: errorMessage(e) }));
      });
      s.on('error', (e) => log.debug(`control client went away: ${e.message}`));
    });
    await new Promise<void>((resolve) => this.server!.listen(this.path, () => resolve()));
    // Only its owner may connect (the folder is 0700 too).
    chmodSync(this.path, 0o600);
  }

  close(): void {
    this.server?.close();
    rmSync(this.path, { force: true });
  }
}

/** Sends one command to a standby's control socket. */
export async function controlCommand(
  stateDir: string,
  cmd: 'failover' | 'switchover' | 'status' | 'stop' | 'release',
): Promise<Record<string, unknown>> {
  const path = join(resolve(stateDir), 'control.sock');
  return new Promise((resolveP, reject) => {
    const s = connect(path);
    let buf = '';
    s.setEncoding('utf8');
    s.on('data', (d: string) => {
      buf += d;
    });
    s.on('end', () => {
      try {
        resolveP(JSON.parse(buf) as Record<string, unknown>);
      } catch {
        reject(new RubatoError('RUBATO_CONFIG', `bad answer from ${path}`));
      }
    });
    s.on('error', (e) =>
      reject(
        new RubatoError(
          'RUBATO_NOT_RUNNING',
          `no Rubato controller is running in ${resolve(stateDir)} (${e.message})`,
          {
            stateDir: resolve(stateDir),
          },
        ),
      ),
    );
    s.write(`${cmd}\n`);
  });
}
