/**
 * The lifecycle's enums, as generated from the proto (`AgentState.ONLINE`,
 * `AgentCategory.ERROR`, `EventType.TRANSITIONED`), with the names the
 * server writes wherever a state is a string ("online") and the seed's
 * category predicates.
 */
import { AgentCategory, AgentState, EventType } from "./gen/agentlifecycle/v1/lifecycle";

export { AgentCategory, AgentState, EventType };

/** A state as the client methods accept it: the enum or a name ("online", "ONLINE", "AGENT_STATE_ONLINE"). */
export type StateLike = AgentState | string;

const NAMES: Record<string, AgentState> = {};
for (const [name, value] of Object.entries(AgentState)) {
  if (typeof value === "number" && value > 0) {
    NAMES[name.toLowerCase()] = value;
  }
}

/** The lowercase name of a state ("online"); "unspecified" for 0. */
export function stateLabel(state: AgentState): string {
  const name = AgentState[state] as string | undefined;
  return name === undefined ? `state_${state}` : name.toLowerCase();
}

/** A state from the enum or a name in any case; throws naming the value when it is neither. */
export function parseState(value: StateLike): AgentState {
  if (typeof value === "number") {
    if (value >= AgentState.REGISTERED && value <= AgentState.DELETED) {
      return value;
    }
    throw new RangeError(`${value} is not an agent state number (1..18)`);
  }
  const key = value.trim().toLowerCase().replace(/^agent_state_/, "");
  const state = NAMES[key];
  if (state === undefined) {
    throw new RangeError(`unknown agent state ${JSON.stringify(value)} (known: ${Object.keys(NAMES).join(", ")})`);
  }
  return state;
}

/** The states of a comma-separated list of lowercase names, as in error metadata ("deploying,deleted"). */
export function statesFromNames(text: string): AgentState[] {
  const out: AgentState[] = [];
  for (const name of text.split(",")) {
    const state = NAMES[name.trim().toLowerCase()];
    if (state !== undefined) {
      out.push(state);
    }
  }
  return out;
}

/** ONLINE, BUSY or IDLE. */
export function isOperational(state: AgentState): boolean {
  return state === AgentState.ONLINE || state === AgentState.BUSY || state === AgentState.IDLE;
}

/** ERROR, FAILED or TIMEOUT. */
export function isErrorState(state: AgentState): boolean {
  return state === AgentState.ERROR || state === AgentState.FAILED || state === AgentState.TIMEOUT;
}

/** MAINTENANCE, SUSPENDED or UPDATING. */
export function isMaintenance(state: AgentState): boolean {
  return state === AgentState.MAINTENANCE || state === AgentState.SUSPENDED || state === AgentState.UPDATING;
}
