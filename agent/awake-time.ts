/**
 * Time the sandbox spent awake. A paused sandbox is frozen (a cgroup freeze, or a VM stopped by its
 * hypervisor), but the clocks its timers run on keep going: after a resume every timer whose
 * deadline fell inside the pause fires at once. Idle timeouts and command deadlines count awake
 * time instead, so a session idle only because its sandbox was paused is not idle.
 *
 * The agent cannot see a freeze begin or end; it sees its aftermath: a tick due every `TICK_MS`
 * comes much later. A step between two readings longer than `MAX_STEP_MS` counts as `TICK_MS` of
 * awake time, the rest as frozen. (An event loop blocked that long undercounts the same way; the
 * timers here are seconds to hours, where that is no matter.) The ticker runs only while a timer
 * is armed and never keeps the agent alive.
 */
const TICK_MS = 1000;
const MAX_STEP_MS = 3000;

let awakeMs = 0;
let lastReading = performance.now();
let armed = 0;
let ticker: NodeJS.Timeout | undefined;

/** Awake milliseconds since the agent started (a monotonic count that stands still while frozen). */
export function awakeNow(): number {
  const now = performance.now();
  const step = now - lastReading;
  lastReading = now;
  awakeMs += step > MAX_STEP_MS ? TICK_MS : Math.max(0, step);
  return awakeMs;
}

function hold(): void {
  if (armed++ > 0) return;
  awakeNow(); // the time before the ticker ran is not measured by it: start the count from now
  ticker = setInterval(awakeNow, TICK_MS);
  ticker.unref();
}

function release(): void {
  if (--armed > 0) return;
  clearInterval(ticker);
  ticker = undefined;
}

/** A pending call of `fn` after `ms` of awake time; `cancel` it, or `restart` it from now. */
export interface AwakeTimer {
  cancel(): void;
  restart(): void;
}

/**
 * Calls `fn` once `ms` of awake time passed (not counting time the sandbox was frozen). Unref'd:
 * it never keeps the agent alive by itself.
 */
export function afterAwake(ms: number, fn: () => void): AwakeTimer {
  let timer: NodeJS.Timeout | undefined;
  let deadline = 0;
  let live = false;
  const check = () => {
    const left = deadline - awakeNow();
    if (left > 0) {
      timer = setTimeout(check, left);
      timer.unref();
      return;
    }
    stop();
    fn();
  };
  const stop = () => {
    clearTimeout(timer);
    if (live) release();
    live = false;
  };
  const start = () => {
    stop();
    hold();
    live = true;
    deadline = awakeNow() + ms;
    timer = setTimeout(check, ms);
    timer.unref();
  };
  start();
  return { cancel: stop, restart: start };
}
