// QMP client: newline-delimited JSON over a unix socket. Greeting, capabilities negotiation,
// concurrent commands matched by id, events, typed errors and per-command timeouts.
// It never retries a command by itself: the caller decides what a failed command means.

import { connect, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { RubatoError } from '../util/index.ts';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  command: string;
}

const MAX_LINE_BYTES = 16 << 20;

export class QmpClient extends EventEmitter {
  private socket: Socket | null = null;
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  greeting: Record<string, unknown> | null = null;

  constructor(
    private readonly path: string,
    private readonly vmName: string,
    private readonly defaultTimeoutMs = 10_000,
  ) {
    super();
  }

  /** Connects (retrying while QEMU creates the socket), reads the greeting, negotiates capabilities. */
  async connect(deadlineMs = 10_000): Promise<void> {
    const until = Date.now() + deadlineMs;
    for (;;) {
      try {
        await this.tryConnect();
        break;
      } catch (e) {
        if (Date.now() > until) {
          throw new RubatoError(
            'RUBATO_QMP_CLOSED',
            `cannot connect to QMP of VM ${this.vmName} at ${this.path}`,
            { vm: this.vmName },
            { cause: e },
          );
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    await this.execute('qmp_capabilities');
  }

  private tryConnect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = connect(this.path);
      const onError = (e: Error) => {
        s.destroy();
        reject(e);
      };
      s.once('error', onError);
      s.setEncoding('utf8');
      let greeted = false;
      s.on('data', (chunk: string) => {
        this.buf += chunk;
        if (this.buf.length > MAX_LINE_BYTES) {
          this.fail(
            new RubatoError('RUBATO_QMP_ERROR', `QMP line too long from VM ${this.vmName}`, { vm: this.vmName }),
          );
          return;
        }
        let nl: number;
        while ((nl = this.buf.indexOf('\n')) >= 0) {
          const line = this.buf.slice(0, nl).trim();
          this.buf = this.buf.slice(nl + 1);
          if (!line) continue;
          let msg: Record<string, unknown>;
          try {
            msg = JSON.parse(line) as Record<string, unknown>;
          } catch {
            continue;
          }
          if (!greeted && 'QMP' in msg) {
            greeted = true;
            this.greeting = msg;
            this.socket = s;
            s.off('error', onError);
            s.on('error', (e) => this.fail(e));
            s.on('close', () =>
              this.fail(
                new RubatoError('RUBATO_QMP_CLOSED', `QMP connection to VM ${this.vmName} closed`, { vm: this.vmName }),
              ),
            );
            resolve();
            continue;
          }
          this.dispatch(msg);
        }
      });
    });
  }

  private dispatch(msg: Record<string, unknown>): void {
    if (typeof msg['event'] === 'string') {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    const id = typeof msg['id'] === 'string' ? msg['id'] : undefined;
    if (id === undefined) return;
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const err = msg['error'] as { class?: string; desc?: string };
      p.reject(
        new RubatoError(
          'RUBATO_QMP_ERROR',
          `QMP ${p.command} failed on VM ${this.vmName}: ${err.desc ?? 'unknown error'}`,
          { vm: this.vmName, command: p.command, class: err.class },
        ),
      );
    } else {
      p.resolve(msg['return']);
    }
  }

  private fail(e: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(e);
    }
    this.pending.clear();
    this.socket?.destroy();
    this.emit('close', e);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = this.defaultTimeoutMs): Promise<T> {
    if (this.closed || !this.socket) {
      return Promise.reject(
        new RubatoError('RUBATO_QMP_CLOSED', `QMP of VM ${this.vmName} is not connected (${command})`, {
          vm: this.vmName,
          command,
        }),
      );
    }
    const id = `r${this.nextId++}`;
    const socket = this.socket;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(
          new RubatoError('RUBATO_QMP_TIMEOUT', `QMP ${command} on VM ${this.vmName} timed out after ${timeoutMs} ms`, {
            vm: this.vmName,
            command,
          }),
        );
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer, command });
      socket.write(`${JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id })}\n`);
    });
  }

  /** Waits for the next event with this name (and matching predicate), with a timeout. */
  waitEvent(name: string, timeoutMs: number, pred: (e: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event === name && pred(e)) {
          cleanup();
          resolve(e);
        }
      };
      const onClose = (e: Error) => {
        cleanup();
        reject(e);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new RubatoError('RUBATO_QMP_TIMEOUT', `no ${name} event from VM ${this.vmName} within ${timeoutMs} ms`, {
            vm: this.vmName,
          }),
        );
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RubatoError('RUBATO_QMP_CLOSED', `QMP client for VM ${this.vmName} closed`, { vm: this.vmName }));
    }
    this.pending.clear();
    this.socket?.destroy();
  }
}
