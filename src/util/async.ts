// Waiting, once: sleep (cancellable), a loop's wake-up, polling for a condition, a deadline on a promise, an event
// within a time, and a line splitter for child processes' output. Every module imports these instead of its own copy.

import type { EventEmitter } from 'node:events';
import { RubatoError, type ErrorCode } from './errors.ts';

/** Resolves after `ms`, or early (without error) when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const t = setTimeout(done, Math.max(0, ms));
    signal?.addEventListener('abort', done, { once: true });
  });
}

/**
 * A wait that ends early on a word: `sleep(ms)` resolves after `ms` or at the next `wake()`,
 * whichever is first (true when woken). `wake()` ends every sleep under way; a wake with nobody
 * asleep is not remembered.
 */
export class Wakeup {
  private readonly waiters = new Set<(woken: boolean) => void>();

  sleep(ms: number): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      const done = (woken: boolean) => {
        if (t) clearTimeout(t);
        this.waiters.delete(done);
        resolve(woken);
      };
      const t = Number.isFinite(ms) ? setTimeout(() => done(false), Math.max(0, ms)) : null;
      this.waiters.add(done);
    });
  }

  wake(): void {
    for (const w of [...this.waiters]) w(true);
  }
}

/**
 * Polls `f` (awaited: it may ask over a channel) every `everyMs` until it returns a value (not undefined, null or
 * false); RUBATO_TIMEOUT after `ms`.
 */
export async function waitFor<T>(
  f: () => T | undefined | null | false | Promise<T | undefined | null | false>,
  ms: number,
  what: string,
  everyMs = 25,
): Promise<T> {
  const until = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== null && v !== false) return v;
    if (Date.now() > until) throw new RubatoError('RUBATO_TIMEOUT', `timed out after ${ms} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** `p`, or a RubatoError with `code` once `ms` have passed. */
export function withTimeout<T>(
  p: Promise<T>,
  ms: number,
  /** What did not happen (a function: said as it stands when the time is up). */
  what: string | (() => string),
  code: ErrorCode = 'RUBATO_STREAM_TIMEOUT',
): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new RubatoError(code, `${typeof what === 'function' ? what() : what} within ${ms} ms`)),
        ms,
      );
    }),
  ]);
}

/**
 * Whether `emitter` emits `event` within `ms`. Its listener goes either way: a wait that times out
 * again and again (a session retried each second) leaves nothing behind on the emitter.
 */
export function onceWithin(emitter: EventEmitter, event: string, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const onEvent = () => {
      clearTimeout(t);
      resolve(true);
    };
    const t = setTimeout(() => {
      emitter.off(event, onEvent);
      resolve(false);
    }, ms);
    emitter.once(event, onEvent);
  });
}

/** Splits a byte or text stream into lines; keeps at most `maxLineBytes` of an unterminated line. */
export class LineSplitter {
  private partial = '';
  constructor(
    private readonly onLine: (line: string) => void,
    private readonly maxLineBytes = 1 << 16,
  ) {}
  push(chunk: Buffer | string): void {
    const lines = (this.partial + chunk.toString()).split('\n');
    this.partial = (lines.pop() ?? '').slice(-this.maxLineBytes);
    for (const l of lines) this.onLine(l.replace(/\r$/, ''));
  }
  end(): void {
    if (this.partial) this.onLine(this.partial);
    this.partial = '';
  }
}
