// CLI option parsing helpers: every number and choice is checked at the boundary with a clear
// message (exit 2), never a stack trace.

import { RubatoError } from '../util/errors.ts';

export function intOpt(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new RubatoError('RUBATO_CONFIG', `--${name} must be a whole number from ${min} to ${max} (got "${v}")`);
    return n;
  };
}

export function numOpt(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min || n > max) throw new RubatoError('RUBATO_CONFIG', `--${name} must be a number from ${min} to ${max} (got "${v}")`);
    return n;
  };
}

export function choiceOpt<T extends string>(name: string, choices: readonly T[]) {
  return (v: string): T => {
    if (!(choices as readonly string[]).includes(v)) throw new RubatoError('RUBATO_CONFIG', `--${name} must be one of ${choices.join(', ')} (got "${v}")`);
    return v as T;
  };
}
