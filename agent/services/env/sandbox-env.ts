import { z } from 'zod';
import { ProcessEnv } from '../../../shared/schemas/common.js';

/**
 * What the agent's `pool.claim` takes: the sandbox's new envVars, bounded like a command's own env (names,
 * NUL-free values, the kernel's argument limits) and in number.
 */
export const SandboxEnvInput = z.object({
  vars: ProcessEnv.refine((vars) => Object.keys(vars).length <= 4096, 'at most 4096 variables').refine(
    (vars) => Object.keys(vars).every((name) => /^[A-Za-z_][A-Za-z0-9_]{0,255}$/.test(name)),
    'variable names are letters, digits and "_" (at most 256), not starting with a digit',
  ),
});

/**
 * The sandbox's envVars inside the environment every command inherits (`base`, the one object the
 * process, terminal and shell managers spread at each spawn). A warm-pool sandbox is built with
 * none and gets its owner's when it is claimed: `replace` takes the previous envVars out (giving
 * back any plain variable one had shadowed, such as PATH) and puts the new ones in. Commands
 * already running keep the environment they started with; later ones see the new one.
 */
export class SandboxEnv {
  /** The plain environment without any envVars, to restore what a removed one had shadowed. */
  readonly #plain: NodeJS.ProcessEnv;
  #keys: string[];

  constructor(
    private readonly base: NodeJS.ProcessEnv,
    plain: NodeJS.ProcessEnv,
    initial: Record<string, string>,
  ) {
    this.#plain = { ...plain };
    this.#keys = Object.keys(initial);
  }

  replace(vars: Record<string, string>): { count: number } {
    const sandboxId = this.base.VOIDRUN_SANDBOX_ID;
    for (const key of this.#keys) {
      if (key in this.#plain) this.base[key] = this.#plain[key];
      else delete this.base[key];
    }
    Object.assign(this.base, vars);
    // The id is the agent's to set, never an envVar's (as at boot, where it is assigned last).
    this.base.VOIDRUN_SANDBOX_ID = sandboxId;
    this.#keys = Object.keys(vars);
    return { count: this.#keys.length };
  }
}
