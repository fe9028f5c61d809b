// The fields of a /proc/<pid>/stat (or task) file after the command name, which may itself hold
// spaces and parentheses: field 3 of proc(5) (the state) is index 0, utime (14) index 11.

import { readFileSync } from 'node:fs';

/** The fields after `(comm)`, or null when the file cannot be read (the process is gone). */
export function procStatFields(path: string): string[] | null {
  let s: string;
  try {
    s = readFileSync(path, 'utf8');
  } catch {
    return null;
  }
  return s.slice(s.lastIndexOf(')') + 2).split(' ');
}
