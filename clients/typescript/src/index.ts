/**
 * Client for the agent-lifecycle control plane (agentlifecycle.v1).
 *
 * `Client` has one method per RPC; `watch()` is an async iterator of events
 * that resumes by itself. The messages are generated from the proto by
 * ts-proto (`messages`); errors are the typed classes of `./errors`.
 */
export * from "./client";
export * from "./errors";
export * from "./states";
export type { Violation } from "./details";
export { DEFAULT_RETRY, type RetryPolicy, type TlsOptions } from "./transport";
export { Watch, type WatchOptions } from "./watch";
export * as messages from "./gen/agentlifecycle/v1/lifecycle";
export type { Agent, LifecycleEvent, StateTransition } from "./gen/agentlifecycle/v1/lifecycle";
