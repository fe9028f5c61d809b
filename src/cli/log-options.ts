// The logging options every command takes (see main.ts).
import { RubatoError, LOG_FORMATS, LOG_LEVELS } from '../util/index.ts';

/**
 * --log-level and --log-format apply to every command wherever they appear: taken out of the
 * arguments here and passed on as RUBATO_LOG / RUBATO_LOG_FORMAT (to processes started too).
 */
export function takeLogOptions(argv: string[], env: NodeJS.ProcessEnv = process.env): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const m = /^--log-(level|format)(?:=(.*))?$/.exec(a);
    if (!m || i < 2) {
      out.push(a);
      continue;
    }
    const value = m[2] ?? argv[++i];
    const allowed: readonly string[] = m[1] === 'level' ? LOG_LEVELS : LOG_FORMATS;
    if (value === undefined || !allowed.includes(value))
      throw new RubatoError(
        'RUBATO_CONFIG',
        `--log-${m[1]} must be one of ${allowed.join(', ')}${value === undefined ? '' : ` (got "${value}")`}`,
      );
    env[m[1] === 'level' ? 'RUBATO_LOG' : 'RUBATO_LOG_FORMAT'] = value;
  }
  return out;
}
