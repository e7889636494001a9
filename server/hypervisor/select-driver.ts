import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { AgentFiles } from '../agent-client/agent-bundle.js';
import { ContainerDriver } from './container/driver.js';
import type { IdMapping } from './container/oci-spec.js';
import type { SandboxDriver } from './types.js';

export interface DriverChoice {
  driver: SandboxDriver | null;
  /** Why no driver (or why this one), in one line. */
  reason: string;
}

/**
 * The driver `SANDBOX_DRIVER` asks for, or with `auto` the best one available here. Only the
 * container driver exists so far; asking for another is refused with a clear reason.
 */
export async function selectDriver(config: Config, deps: { agent: AgentFiles; idMap: IdMapping; log: Logger }): Promise<DriverChoice> {
  const container = new ContainerDriver({
    instancesDir: config.INSTANCES_DIR,
    runcRoot: config.RUNC_ROOT,
    idMap: deps.idMap,
    pidsLimit: config.SANDBOX_PIDS_LIMIT,
    agent: deps.agent,
    agentReadyTimeoutMs: config.AGENT_READY_TIMEOUT_MS,
    log: deps.log,
  });
  if (config.SANDBOX_DRIVER !== 'auto' && config.SANDBOX_DRIVER !== 'container') {
    return { driver: null, reason: `SANDBOX_DRIVER=${config.SANDBOX_DRIVER} is not available in this version; use container or auto` };
  }
  const availability = await container.available();
  if (!availability.ok) return { driver: null, reason: `container driver unavailable: ${availability.reason}` };
  return {
    driver: container,
    reason: config.SANDBOX_DRIVER === 'auto' ? 'auto: container (runc) is available; microVM drivers are not built into this version' : 'SANDBOX_DRIVER=container',
  };
}
