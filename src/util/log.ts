// A small leveled logger on stderr: one line per event, `component: message key=value`, or with
// RUBATO_LOG_FORMAT=json one JSON object per line {time, level, component, message, ...fields}.
// Level from RUBATO_LOG (debug|info|warn|error|silent); it never writes to stdout, which carries results.
// The CLI's --log-level and --log-format set both variables, so processes it starts inherit them.

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
export type Level = keyof typeof LEVELS;
export const LOG_LEVELS = Object.keys(LEVELS) as Level[];
export const LOG_FORMATS = ['text', 'json'] as const;

function currentLevel(): number {
  const name = (process.env['RUBATO_LOG'] ?? 'info') as Level;
  return LEVELS[name] ?? LEVELS.info;
}

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  enabled(level: Level): boolean;
}

function fmt(fields?: Record<string, unknown>): string {
  if (!fields) return '';
  return Object.entries(fields)
    .map(([k, v]) => ` ${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join('');
}

/**
 * One log event as a JSON line: time (ISO 8601), level, component, message, then its fields (never overriding those
 * four).
 */
export function jsonLine(level: Level, component: string, message: string, fields?: Record<string, unknown>): string {
  const rec: Record<string, unknown> = { time: new Date().toISOString(), level, component, message };
  for (const [k, v] of Object.entries(fields ?? {})) if (!(k in rec)) rec[k] = v instanceof Error ? v.message : v;
  try {
    return JSON.stringify(rec);
  } catch {
    return JSON.stringify({ time: rec['time'], level, component, message });
  }
}

export function logger(component: string): Logger {
  const write = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] < currentLevel()) return;
    if (process.env['RUBATO_LOG_FORMAT'] === 'json') {
      process.stderr.write(`${jsonLine(level, component, msg, fields)}\n`);
      return;
    }
    const t = new Date().toISOString().slice(11, 23);
    process.stderr.write(`${t} ${level.padEnd(5)} ${component}: ${msg}${fmt(fields)}\n`);
  };
  return {
    debug: (m, f) => write('debug', m, f),
    info: (m, f) => write('info', m, f),
    warn: (m, f) => write('warn', m, f),
    error: (m, f) => write('error', m, f),
    enabled: (level) => LEVELS[level] >= currentLevel(),
  };
}
