// Typed errors with a stable code that operators and tests match on, plus context (VM, epoch, peer).
// Expected failures are RubatoErrors; anything else reaching the CLI is a bug and shown as one.

export type ErrorCode =
  | 'RUBATO_CONFIG'
  | 'RUBATO_SETUP_FAILED'
  | 'RUBATO_QEMU_START'
  | 'RUBATO_QEMU_EXITED'
  | 'RUBATO_QMP_ERROR'
  | 'RUBATO_QMP_TIMEOUT'
  | 'RUBATO_QMP_CLOSED'
  | 'RUBATO_STREAM_FORMAT'
  | 'RUBATO_STREAM_UNSUPPORTED'
  | 'RUBATO_STREAM_TRUNCATED'
  | 'RUBATO_STREAM_TIMEOUT'
  | 'RUBATO_CAPTURE_FAILED'
  | 'RUBATO_REPLICA_CORRUPT'
  | 'RUBATO_RESTORE_FAILED'
  | 'RUBATO_SECONDARY'
  | 'RUBATO_ACCEL'
  | 'RUBATO_PROTOCOL'
  | 'RUBATO_AUTH_FAILED'
  | 'RUBATO_VERSION_MISMATCH'
  | 'RUBATO_PEER_LOST'
  | 'RUBATO_NETNS'
  | 'RUBATO_TIMEOUT'
  | 'RUBATO_IMAGE_IN_USE'
  | 'RUBATO_BRIDGE_MISSING'
  | 'RUBATO_VM_OWNED'
  | 'RUBATO_TAP_BUSY'
  | 'RUBATO_NOT_RUNNING'
  | 'RUBATO_MIGRATION';

/**
 * The CLI's exit status per error: a script tells a config mistake from a refused key, a busy
 * image or a missing bridge without parsing the message. 1 is any other failure. The README's
 * table of exit codes is checked against this one (test/unit/exit-codes.test.ts), and so are the
 * systemd units' RestartPreventExitStatus (the codes a restart cannot cure: `PERMANENT_EXIT_CODES`).
 */
export const EXIT_CODES: Partial<Record<ErrorCode, number>> = {
  RUBATO_CONFIG: 2,
  RUBATO_AUTH_FAILED: 3,
  RUBATO_VERSION_MISMATCH: 3,
  RUBATO_IMAGE_IN_USE: 4,
  RUBATO_TAP_BUSY: 4,
  RUBATO_BRIDGE_MISSING: 5,
  RUBATO_SETUP_FAILED: 6,
  RUBATO_QEMU_START: 7,
  RUBATO_VM_OWNED: 8,
  RUBATO_NOT_RUNNING: 9,
};

/** Exit codes after which restarting the same command cannot help (the units do not restart on them). */
export const PERMANENT_EXIT_CODES: readonly number[] = [2, 3, 4, 5, 8];

export class RubatoError extends Error {
  readonly code: ErrorCode;
  readonly context: Record<string, unknown>;
  constructor(code: ErrorCode, message: string, context: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'RubatoError';
    this.code = code;
    this.context = context;
  }
}

export function isRubatoError(e: unknown, code?: ErrorCode): e is RubatoError {
  return e instanceof RubatoError && (code === undefined || e.code === code);
}

/** Invariant check that stays on in production: a crash beats a wrong answer. */
export function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(`invariant violated: ${what}`);
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
