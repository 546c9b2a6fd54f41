/**
 * The watch: an async iterator of events that reconnects by itself. A
 * connection that fails for any transport reason (the server killed or
 * stopping, a proxy cutting the stream, nothing heard for `idleTimeoutMs`)
 * is replaced after a back-off by one that starts right after the last event
 * yielded, on the next endpoint when the server was unavailable. Refusals of
 * the request itself (compaction, permissions, a bad filter) end the
 * iteration with their typed error.
 */
import { type ClientReadableStream, status as Status } from "@grpc/grpc-js";

import { Cursor } from "./cursor";
import { LifecycleError, UnavailableError, fromGrpcError } from "./errors";
import type { Agent, LifecycleEvent, WatchEventsRequest, WatchEventsResponse } from "./gen/agentlifecycle/v1/lifecycle";
import { Backoff, type RetryPolicy, sleep, watchRetryable } from "./transport";

/** What a watch needs from its client. */
export interface WatchHost {
  readonly retry: RetryPolicy;
  /** The client was closed: end instead of reconnecting. */
  readonly closed: boolean;
  /** The watch has ended. */
  forget(watch: Watch): void;
  currentEndpoint(): number;
  advance(index: number): void;
  headForWatch(): Promise<number | undefined>;
  openWatch(index: number, request: WatchEventsRequest): ClientReadableStream<WatchEventsResponse>;
}

export interface WatchOptions {
  /** Reconnect when nothing (not even a progress message) arrived for this long; default 60000. Keep it above twice the server's --progress-interval. */
  idleTimeoutMs?: number;
  /** Give up (reject with the last error) after failing to reconnect for this long; default: never. */
  reconnectTimeoutMs?: number;
}

export class Watch implements AsyncIterable<LifecycleEvent> {
  private stream: ClientReadableStream<WatchEventsResponse> | undefined;
  private iterator: AsyncIterator<WatchEventsResponse> | undefined;
  private index = 0;
  private failingSince: number | undefined;
  private idleCancelled = false;
  private readonly backoff: Backoff;
  private readonly closed = new AbortController();
  private readonly idleTimeoutMs: number;

  constructor(
    private readonly host: WatchHost,
    private readonly cursor: Cursor,
    private readonly options: WatchOptions = {},
  ) {
    this.backoff = new Backoff(host.retry);
    this.idleTimeoutMs = options.idleTimeoutMs ?? 60000;
    if (!(this.idleTimeoutMs > 0)) {
      throw new RangeError(`idleTimeoutMs must be positive, got ${this.idleTimeoutMs}`);
    }
  }

  /** The sequence of the last event yielded. */
  get lastSequence(): number | undefined {
    return this.cursor.lastSequence;
  }
  /** Where a reconnection would start. */
  get nextSequence(): number | undefined {
    return this.cursor.nextStart;
  }
  /** Connections opened so far (1 + reconnections). */
  get connections(): number {
    return this.cursor.connections;
  }
  /** The sequence the snapshot shows the fleet at. */
  get snapshotHead(): number {
    return this.cursor.snapshotHead;
  }

  /**
   * Fixes where a live watch starts (the server's head now), so that changes
   * made after this resolves are delivered; otherwise a live watch starts
   * from the head when it is first read.
   */
  async start(): Promise<this> {
    if (this.cursor.needsHead) {
      const head = await this.host.headForWatch();
      if (head !== undefined) {
        this.cursor.nextStart = head + 1;
      }
    }
    return this;
  }

  /** The fleet as the watch started (`snapshot: true` only); the events after it follow through iteration. */
  async snapshot(): Promise<Agent[]> {
    if (!this.cursor.wantSnapshot) {
      throw new Error("this watch was not opened with snapshot: true");
    }
    while (this.cursor.snapshot === undefined) {
      const message = await this.receive();
      if (message === undefined) {
        return [];
      }
      this.cursor.accept(message);
    }
    return this.cursor.snapshot;
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<LifecycleEvent, void, undefined> {
    try {
      for (;;) {
        const message = await this.receive();
        if (message === undefined) {
          return;
        }
        const event = this.cursor.accept(message);
        if (event !== undefined) {
          yield event;
        }
      }
    } finally {
      this.close();
    }
  }

  /** Ends the watch; iteration stops. */
  close(): void {
    this.closed.abort();
    this.drop();
    this.host.forget(this);
  }

  private drop(): void {
    const stream = this.stream;
    this.stream = undefined;
    this.iterator = undefined;
    stream?.cancel();
  }

  private async open(): Promise<void> {
    await this.start();
    this.index = this.host.currentEndpoint();
    this.idleCancelled = false;
    const stream = this.host.openWatch(this.index, this.cursor.request());
    this.stream = stream;
    this.iterator = stream[Symbol.asyncIterator]() as AsyncIterator<WatchEventsResponse>;
    if (this.closed.signal.aborted) {
      // close() ran while the head was being read.
      this.drop();
    }
  }

  /** The next message (undefined once closed), reconnecting as often as needed. */
  private async receive(): Promise<WatchEventsResponse | undefined> {
    for (;;) {
      if (this.closed.signal.aborted || this.host.closed) {
        return undefined;
      }
      let error: LifecycleError;
      try {
        if (this.iterator === undefined) {
          await this.open();
        }
        const next = await this.nextWithin(this.idleTimeoutMs);
        if (next.done) {
          error = new UnavailableError(Status.UNAVAILABLE, "the server ended the stream");
        } else {
          this.failingSince = undefined;
          this.backoff.reset();
          return next.value;
        }
      } catch (e) {
        error = this.idleCancelled
          ? new UnavailableError(Status.UNAVAILABLE, "no message within idleTimeoutMs")
          : fromGrpcError(e);
      }
      await this.recover(error);
    }
  }

  private async nextWithin(ms: number): Promise<IteratorResult<WatchEventsResponse>> {
    const iterator = this.iterator;
    const stream = this.stream;
    if (iterator === undefined || stream === undefined) {
      return { done: true, value: undefined };
    }
    const timer = setTimeout(() => {
      this.idleCancelled = true;
      stream.cancel();
    }, ms);
    try {
      return await iterator.next();
    } finally {
      clearTimeout(timer);
    }
  }

  private async recover(error: LifecycleError): Promise<void> {
    this.drop();
    if (this.closed.signal.aborted || this.host.closed) {
      this.closed.abort();
      return;
    }
    if (!watchRetryable(error)) {
      this.closed.abort();
      throw error;
    }
    const now = Date.now();
    if (this.failingSince === undefined) {
      this.failingSince = now;
    } else if (this.options.reconnectTimeoutMs !== undefined && now - this.failingSince > this.options.reconnectTimeoutMs) {
      this.closed.abort();
      throw error;
    }
    if (error.code === Status.UNAVAILABLE || error.code === Status.CANCELLED) {
      this.host.advance(this.index);
    }
    await sleep(this.backoff.delayMs(error), this.closed.signal);
  }
}
