// The one way to carry out the epoch pipeline's commands, shared by the live primary and the
// fault simulator. Each call site names a handler for every command it expects; a command it did
// not expect is a bug and fails an assertion — never a silent `default: break`.

import { assert } from '../util/index.ts';
import type { Sized } from '../commit/index.ts';
import type { Command } from './pipeline.ts';

export type CommandName = Command['cmd'];
export type CommandOf<K extends CommandName, F extends Sized = Buffer> = Extract<Command<F>, { cmd: K }>;

/** A handler per command a call site expects. */
export type CommandHandlers<F extends Sized = Buffer> = { [K in CommandName]?: (c: CommandOf<K, F>) => void };

/** Carries out `cmds` in order; `where` names the call site in the assertion of an unexpected command. */
export function dispatch<F extends Sized>(
  cmds: readonly Command<F>[],
  handlers: CommandHandlers<F>,
  where: string,
): void {
  for (const c of cmds) {
    const h = handlers[c.cmd] as ((c: Command<F>) => void) | undefined;
    assert(h !== undefined, `${where}: the pipeline asked for '${c.cmd}', which is not handled here`);
    h(c);
  }
}

/**
 * The commands that come from outside the checkpoint loop (an ack, a lost link, the hold timer): every driver handles
 * all of them.
 */
export type OutsideHandlers<F extends Sized = Buffer> = Required<
  Pick<CommandHandlers<F>, 'release' | 'protected' | 'unprotected' | 'release-unprotected' | 'stop-guest'>
>;
