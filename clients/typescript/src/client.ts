/**
 * The client: one method per RPC of agentlifecycle.v1.AgentLifecycleService.
 *
 * Every call rejects with a typed `LifecycleError`. Unary calls are retried
 * on UNAVAILABLE and RESOURCE_EXHAUSTED (waiting RetryInfo's delay when the
 * server gives one); every state-changing call carries a `requestId` (a new
 * UUID unless the caller gives one), the same on every attempt, so a retry of
 * a call whose reply was lost returns the original answer instead of
 * changing the agent twice. With several endpoints, a call that finds one
 * unavailable moves on to the next.
 */
import { randomUUID } from "node:crypto";

import { type ChannelOptions, Client as GrpcClient, Metadata, status as Status } from "@grpc/grpc-js";

import { Cursor } from "./cursor";
import { LifecycleError, fromGrpcError } from "./errors";
import {
  type Agent,
  AgentLifecycleServiceService as S,
  type GetAgentAnalyticsResponse,
  type GetFleetAnalyticsResponse,
  type GetLifecycleMetricsResponse,
  type HeartbeatRequest,
  type ListAgentsResponse,
  type ListTransitionsResponse,
  type StateTransition,
  type SyncExternalStatusResponse,
  type WatchEventsRequest,
  type WatchEventsResponse,
} from "./gen/agentlifecycle/v1/lifecycle";
import { AgentCategory, AgentState, type EventType, type StateLike, parseState } from "./states";
import {
  Backoff,
  CHANNEL_OPTIONS,
  DEFAULT_RETRY,
  type Endpoint,
  type RetryPolicy,
  type TlsOptions,
  credentials,
  parseEndpoints,
  retryable,
  sleep,
} from "./transport";
import { Watch, type WatchOptions } from "./watch";

export interface ClientOptions {
  /** Sent as `authorization: Bearer TOKEN`. */
  token?: string;
  tls?: TlsOptions;
  /** Deadline of each unary call attempt; default 10000 (the CLI's --timeout). */
  timeoutMs?: number;
  retry?: Partial<RetryPolicy>;
  /** Extra grpc-js channel options. */
  channelOptions?: ChannelOptions;
}

/** The fields every state-changing call takes. */
export interface ChangeOptions {
  reason?: string;
  triggeredBy?: string;
  /** A JSON object, recorded with the transition(s). */
  metadata?: Record<string, unknown>;
  /** Compare-and-set on the agent's version (VersionMismatchError otherwise). */
  expectedVersion?: number;
  /** Idempotency key; a new UUID when absent, the same on every retry. */
  requestId?: string;
  timeoutMs?: number;
}

/** What a state-changing call did: the agent after it and the transitions recorded, in order. */
export interface Change {
  agent: Agent;
  transitions: StateTransition[];
}

/** A point of the event log: a sequence (right after that event; 0 is before the first) or a time. */
export type AsOf = number | Date | undefined;

interface Method<Req, Res> {
  path: string;
  requestSerialize: (value: Req) => Buffer;
  responseDeserialize: (value: Buffer) => Res;
}

export interface WatchFilter extends WatchOptions {
  /** Replay from this sequence (1: the whole retained log). */
  startSequence?: number;
  /** First the current fleet (`watch.snapshot()`), then the events after it. */
  snapshot?: boolean;
  agentIds?: string[];
  states?: StateLike[];
  eventTypes?: EventType[];
  labels?: Record<string, string>;
}

function asOf(point: AsOf): { point: { $case: "sequence"; value: number } | { $case: "time"; value: Date } } | undefined {
  if (point === undefined) {
    return undefined;
  }
  if (point instanceof Date) {
    return { point: { $case: "time", value: point } };
  }
  if (!Number.isSafeInteger(point) || point < 0) {
    throw new RangeError(`asOf sequence must be a non-negative integer, got ${point}`);
  }
  return { point: { $case: "sequence", value: point } };
}

function category(value: AgentCategory | string | undefined): AgentCategory {
  if (value === undefined) {
    return AgentCategory.UNSPECIFIED;
  }
  if (typeof value === "number") {
    return value;
  }
  const key = value.trim().toUpperCase().replace(/^AGENT_CATEGORY_/, "");
  const found = (AgentCategory as unknown as Record<string, AgentCategory | undefined>)[key];
  if (found === undefined || key === "UNSPECIFIED" || key === "UNRECOGNIZED") {
    throw new RangeError(`unknown category ${JSON.stringify(value)} (known: operational, available, error, maintenance)`);
  }
  return found;
}

export class Client {
  readonly retry: RetryPolicy;
  private readonly endpoints: Endpoint[];
  private readonly clients: GrpcClient[];
  private readonly token: string | undefined;
  private readonly timeoutMs: number;
  private current = 0;
  private isClosed = false;
  /** Open watches, ended by close(). */
  private readonly watches = new Set<Watch>();

  constructor(endpoints: string | string[] = "http://127.0.0.1:50051", options: ClientOptions = {}) {
    this.endpoints = parseEndpoints(endpoints, options.tls);
    const channelOptions: ChannelOptions = { ...CHANNEL_OPTIONS, ...options.channelOptions };
    if (options.tls?.serverName) {
      channelOptions["grpc.ssl_target_name_override"] = options.tls.serverName;
    }
    this.clients = this.endpoints.map((e) => new GrpcClient(e.target, credentials(e, options.tls), channelOptions));
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    if (this.retry.maxAttempts < 1) {
      throw new RangeError(`retry.maxAttempts must be at least 1, got ${this.retry.maxAttempts}`);
    }
  }

  /** Configured by the CLI's variables: AGENT_LIFECYCLE_SERVER, _TOKEN, _TLS_CA, _TLS_CLIENT_CERT, _TLS_CLIENT_KEY. */
  static fromEnv(options: ClientOptions = {}): Client {
    const env = process.env;
    const ca = env["AGENT_LIFECYCLE_TLS_CA"] || undefined;
    const cert = env["AGENT_LIFECYCLE_TLS_CLIENT_CERT"] || undefined;
    const key = env["AGENT_LIFECYCLE_TLS_CLIENT_KEY"] || undefined;
    const tls = ca || cert || key ? { caFile: ca, clientCertFile: cert, clientKeyFile: key } : undefined;
    return new Client(env["AGENT_LIFECYCLE_SERVER"] || "http://127.0.0.1:50051", {
      token: env["AGENT_LIFECYCLE_TOKEN"] || undefined,
      tls,
      ...options,
    });
  }

  /** Closes the connections (open watches end). */
  close(): void {
    this.isClosed = true;
    for (const watch of [...this.watches]) {
      watch.close();
    }
    for (const client of this.clients) {
      client.close();
    }
  }

  /** The endpoint calls go to now. */
  get endpoint(): string {
    return this.endpoints[this.current]?.target ?? "";
  }

  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.token) {
      metadata.set("authorization", `Bearer ${this.token}`);
    }
    return metadata;
  }

  private once<Req, Res>(index: number, method: Method<Req, Res>, request: Req, timeoutMs: number): Promise<Res> {
    const client = this.clients[index];
    if (client === undefined) {
      return Promise.reject(new Error(`no endpoint ${index}`));
    }
    return new Promise((resolve, reject) => {
      client.makeUnaryRequest(
        method.path,
        method.requestSerialize,
        method.responseDeserialize,
        request,
        this.metadata(),
        { deadline: Date.now() + timeoutMs },
        (error, value) => (error || value === undefined ? reject(error ?? new Error("empty reply")) : resolve(value)),
      );
    });
  }

  private async unary<Req, Res>(method: Method<Req, Res>, request: Req, timeoutMs?: number): Promise<Res> {
    const backoff = new Backoff(this.retry);
    for (let attempt = 1; ; attempt++) {
      const index = this.current;
      let error: LifecycleError;
      try {
        return await this.once(index, method, request, timeoutMs ?? this.timeoutMs);
      } catch (e) {
        error = fromGrpcError(e);
      }
      if (!retryable(error) || attempt >= this.retry.maxAttempts) {
        throw error;
      }
      if (error.code === Status.UNAVAILABLE) {
        this.advance(index);
      }
      await sleep(backoff.delayMs(error));
    }
  }

  private async change<Req, Res extends { agent: Agent | undefined; transitions: StateTransition[] }>(
    method: Method<Req, Res>,
    request: Req,
    timeoutMs?: number,
  ): Promise<Change> {
    const response = await this.unary(method, request, timeoutMs);
    return { agent: response.agent as Agent, transitions: response.transitions };
  }

  private common(options: ChangeOptions): {
    reason: string;
    triggeredBy: string;
    metadata: Record<string, unknown> | undefined;
    expectedVersion: number | undefined;
    requestId: string;
  } {
    return {
      reason: options.reason ?? "",
      triggeredBy: options.triggeredBy ?? "",
      metadata: options.metadata,
      expectedVersion: options.expectedVersion,
      requestId: options.requestId || randomUUID(),
    };
  }

  // --- state changes ---------------------------------------------------------

  /** Creates an agent in REGISTERED (the server picks the id when `agentId` is empty). */
  registerAgent(
    options: { agentId?: string; name?: string; labels?: Record<string, string> } & Omit<ChangeOptions, "expectedVersion"> = {},
  ): Promise<Change> {
    const { expectedVersion: _, ...common } = this.common(options);
    const request = { agentId: options.agentId ?? "", name: options.name ?? "", labels: options.labels ?? {}, ...common };
    return this.change(S.registerAgent, request, options.timeoutMs);
  }

  /** Moves the agent to `target`; TransitionNotAllowedError (with allowedTargets) when the policy refuses. */
  async transitionAgent(agentId: string, target: StateLike, options: ChangeOptions = {}): Promise<Change> {
    const request = { agentId, targetState: parseState(target), ...this.common(options) };
    return this.change(S.transitionAgent, request, options.timeoutMs);
  }

  /** DEPLOYING then DEPLOYED. */
  deployAgent(agentId: string, options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.deployAgent, { agentId, ...this.common(options) }, options.timeoutMs);
  }

  /** STARTING then ONLINE; with waitForHeartbeat only STARTING. */
  startAgent(agentId: string, options: ChangeOptions & { waitForHeartbeat?: boolean } = {}): Promise<Change> {
    const request = { agentId, waitForHeartbeat: options.waitForHeartbeat, ...this.common(options) };
    return this.change(S.startAgent, request, options.timeoutMs);
  }

  /** STOPPING then OFFLINE. */
  stopAgent(agentId: string, options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.stopAgent, { agentId, ...this.common(options) }, options.timeoutMs);
  }

  /** ONLINE or IDLE -> BUSY. */
  assignTask(agentId: string, taskId = "", options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.assignTask, { agentId, taskId, ...this.common(options) }, options.timeoutMs);
  }

  /** BUSY -> IDLE. */
  completeTask(agentId: string, taskId = "", options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.completeTask, { agentId, taskId, ...this.common(options) }, options.timeoutMs);
  }

  /** -> ERROR with reason "Error: <errorMessage>". */
  handleError(agentId: string, errorMessage: string, options: Omit<ChangeOptions, "reason"> = {}): Promise<Change> {
    const { reason: _, ...common } = this.common(options);
    return this.change(S.handleError, { agentId, errorMessage, ...common }, options.timeoutMs);
  }

  /** -> MAINTENANCE. */
  putInMaintenance(agentId: string, options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.putInMaintenance, { agentId, ...this.common(options) }, options.timeoutMs);
  }

  /** MAINTENANCE -> ONLINE. */
  resumeFromMaintenance(agentId: string, options: ChangeOptions = {}): Promise<Change> {
    return this.change(S.resumeFromMaintenance, { agentId, ...this.common(options) }, options.timeoutMs);
  }

  /** Applies a platform status (source: hf_space, kubernetes, docker); `outcome` says what happened. */
  syncExternalStatus(
    agentId: string,
    source: string,
    status: string,
    options: { metadata?: Record<string, unknown>; timeoutMs?: number } = {},
  ): Promise<SyncExternalStatusResponse> {
    return this.unary(S.syncExternalStatus, { agentId, source, status, metadata: options.metadata }, options.timeoutMs);
  }

  /** Reports the agent alive; resolves to the agent after the heartbeat. */
  async heartbeat(agentId: string, options: { load?: number; currentTask?: string; timeoutMs?: number } = {}): Promise<Agent> {
    const request = { agentId, load: options.load, currentTask: options.currentTask ?? "" };
    return (await this.unary(S.heartbeat, request, options.timeoutMs)).agent as Agent;
  }

  /** Sends every heartbeat on one stream; resolves to how many the server counted. Not retried. */
  heartbeatStream(beats: Iterable<HeartbeatRequest>): Promise<number> {
    const client = this.clients[this.current] as GrpcClient;
    return new Promise((resolve, reject) => {
      const call = client.makeClientStreamRequest(
        S.heartbeatStream.path,
        S.heartbeatStream.requestSerialize,
        S.heartbeatStream.responseDeserialize,
        this.metadata(),
        {},
        (error, value) => (error || value === undefined ? reject(fromGrpcError(error)) : resolve(value.heartbeats)),
      );
      for (const beat of beats) {
        call.write(beat);
      }
      call.end();
    });
  }

  // --- reads -----------------------------------------------------------------

  /** The agent now, or as it was at `asOf`. */
  async getAgent(agentId: string, options: { asOf?: AsOf; timeoutMs?: number } = {}): Promise<Agent> {
    const response = await this.unary(S.getAgent, { agentId, asOf: asOf(options.asOf) }, options.timeoutMs);
    return response.agent as Agent;
  }

  /** One page of ListAgents, as the server answers it. */
  async listAgentsPage(
    options: {
      states?: StateLike[];
      category?: AgentCategory | string;
      labels?: Record<string, string>;
      pageSize?: number;
      pageToken?: string;
      asOf?: AsOf;
      timeoutMs?: number;
    } = {},
  ): Promise<ListAgentsResponse> {
    const request = {
      states: (options.states ?? []).map(parseState),
      category: category(options.category),
      labels: options.labels ?? {},
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
      asOf: asOf(options.asOf),
    };
    return this.unary(S.listAgents, request, options.timeoutMs);
  }

  /** Every matching agent, following the pages (a time asOf is pinned to the first page's sequence). */
  async listAgents(
    options: { states?: StateLike[]; category?: AgentCategory | string; labels?: Record<string, string>; asOf?: AsOf; timeoutMs?: number } = {},
  ): Promise<Agent[]> {
    const agents: Agent[] = [];
    let pageToken = "";
    let point = options.asOf;
    for (;;) {
      const page = await this.listAgentsPage({ ...options, pageSize: 1000, pageToken, asOf: point });
      agents.push(...page.agents);
      if (point !== undefined) {
        point = page.asOfSequence;
      }
      pageToken = page.nextPageToken;
      if (!pageToken) {
        return agents;
      }
    }
  }

  /** The agent's retained transitions, oldest first (`limit`: the newest N), following the pages. */
  async getAgentHistory(agentId: string, options: { limit?: number; timeoutMs?: number } = {}): Promise<StateTransition[]> {
    const transitions: StateTransition[] = [];
    let pageToken = "";
    for (;;) {
      const request = { agentId, limit: options.limit ?? 0, pageSize: 0, pageToken };
      const page = await this.unary(S.getAgentHistory, request, options.timeoutMs);
      transitions.push(...page.transitions);
      pageToken = page.nextPageToken;
      if (!pageToken) {
        return transitions;
      }
    }
  }

  /** One page of the audit trail, newest first. */
  listTransitions(
    options: { agentId?: string; principal?: string; pageSize?: number; pageToken?: string; timeoutMs?: number } = {},
  ): Promise<ListTransitionsResponse> {
    const request = {
      agentId: options.agentId ?? "",
      principal: options.principal,
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
    };
    return this.unary(S.listTransitions, request, options.timeoutMs);
  }

  /** One agent's state analytics over `windowSeconds` (default 24 h). */
  getAgentAnalytics(agentId: string, options: { windowSeconds?: number; timeoutMs?: number } = {}): Promise<GetAgentAnalyticsResponse> {
    const window = options.windowSeconds === undefined ? undefined : { seconds: Math.floor(options.windowSeconds), nanos: 0 };
    return this.unary(S.getAgentAnalytics, { agentId, window }, options.timeoutMs);
  }

  /** The fleet's state analytics over `windowSeconds` (default 24 h). */
  getFleetAnalytics(
    options: { windowSeconds?: number; labels?: Record<string, string>; buckets?: number; top?: number; timeoutMs?: number } = {},
  ): Promise<GetFleetAnalyticsResponse> {
    const window = options.windowSeconds === undefined ? undefined : { seconds: Math.floor(options.windowSeconds), nanos: 0 };
    const request = { window, labels: options.labels ?? {}, buckets: options.buckets ?? 0, top: options.top ?? 0 };
    return this.unary(S.getFleetAnalytics, request, options.timeoutMs);
  }

  /** Fleet-wide counts now, or at `asOf`. */
  async getLifecycleMetrics(options: { asOf?: AsOf; timeoutMs?: number } = {}): Promise<GetLifecycleMetricsResponse> {
    return this.unary(S.getLifecycleMetrics, { asOf: asOf(options.asOf) }, options.timeoutMs);
  }

  /** The active policy: each state's allowed targets. */
  async getTransitionRules(options: { timeoutMs?: number } = {}): Promise<Map<AgentState, AgentState[]>> {
    const response = await this.unary(S.getTransitionRules, {}, options.timeoutMs);
    return new Map(response.rules.map((rule) => [rule.fromState, rule.allowedTargets]));
  }

  // --- the event stream -------------------------------------------------------

  /**
   * The event stream as an async iterator of LifecycleEvent that reconnects by
   * itself: every matching event exactly once, in sequence order, across
   * server restarts, dropped connections and moves between endpoints. Neither
   * `startSequence` nor `snapshot`: live, from the server's head when the
   * watch is first read or when `await watch.start()` resolves. Rejects with SequenceCompactedError (oldestAvailableSequence)
   * when retention deleted events the watch still needed.
   */
  watch(filter: WatchFilter = {}): Watch {
    if (filter.snapshot && filter.startSequence !== undefined) {
      throw new Error("snapshot and startSequence cannot be combined");
    }
    if (filter.startSequence !== undefined && !(Number.isSafeInteger(filter.startSequence) && filter.startSequence >= 1)) {
      throw new RangeError(`startSequence must be an integer >= 1, got ${filter.startSequence}`);
    }
    const template = {
      agentIds: filter.agentIds ?? [],
      states: (filter.states ?? []).map(parseState),
      eventTypes: filter.eventTypes ?? [],
      labels: filter.labels ?? {},
      startSequence: 0,
      includeSnapshot: false,
    };
    const cursor = new Cursor(template, filter.startSequence, filter.snapshot ?? false);
    const self = this;
    const watch = new Watch(
      {
        retry: this.retry,
        get closed() {
          return self.isClosed;
        },
        currentEndpoint: () => this.current,
        advance: (index) => this.advance(index),
        headForWatch: () => this.headForWatch(),
        openWatch: (index, request) => this.openWatch(index, request),
        forget: (ended) => this.watches.delete(ended),
      },
      cursor,
      filter,
    );
    this.watches.add(watch);
    return watch;
  }

  private advance(index: number): void {
    if (this.current === index) {
      this.current = (index + 1) % this.clients.length;
    }
  }

  private async headForWatch(): Promise<number | undefined> {
    try {
      return (await this.getLifecycleMetrics()).headSequence;
    } catch (error) {
      if (error instanceof LifecycleError && error.code === Status.PERMISSION_DENIED) {
        return undefined;
      }
      throw error;
    }
  }

  private openWatch(index: number, request: WatchEventsRequest) {
    const client = this.clients[index] as GrpcClient;
    return client.makeServerStreamRequest<WatchEventsRequest, WatchEventsResponse>(
      S.watchEvents.path,
      S.watchEvents.requestSerialize,
      S.watchEvents.responseDeserialize,
      request,
      this.metadata(),
      {},
    );
  }
}
