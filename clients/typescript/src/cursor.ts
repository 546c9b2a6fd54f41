/**
 * Where a watch stands: the request of the next connection and what each
 * message received means. The next connection starts at `nextStart`: the
 * last yielded sequence + 1, or a progress message's or the snapshot's
 * head + 1 when that is further (every matching event up to a head has been
 * delivered). A sequence at or below the last one yielded is never yielded
 * again.
 */
import {
  type Agent,
  type LifecycleEvent,
  WatchEventsRequest,
  type WatchEventsResponse,
} from "./gen/agentlifecycle/v1/lifecycle";

export class Cursor {
  /** start_sequence of the next connection; undefined while unknown. */
  nextStart: number | undefined;
  /** The snapshot, once complete. */
  snapshot: Agent[] | undefined;
  snapshotHead = 0;
  /** The sequence of the last event yielded. */
  lastSequence: number | undefined;
  /** Connections opened so far. */
  connections = 0;
  private pending: Agent[] = [];

  constructor(
    private readonly template: WatchEventsRequest,
    start: number | undefined,
    readonly wantSnapshot: boolean,
  ) {
    this.nextStart = start;
  }

  /** A live watch (no start, no snapshot) learns the head before its first connection. */
  get needsHead(): boolean {
    return this.nextStart === undefined && !this.wantSnapshot;
  }

  /** The request of the next connection. */
  request(): WatchEventsRequest {
    this.connections += 1;
    if (this.wantSnapshot && this.snapshot === undefined) {
      this.pending = [];
      return WatchEventsRequest.create({ ...this.template, includeSnapshot: true, startSequence: 0 });
    }
    return WatchEventsRequest.create({ ...this.template, includeSnapshot: false, startSequence: this.nextStart ?? 0 });
  }

  /** The event to yield for a message, if any; updates the position. */
  accept(message: WatchEventsResponse): LifecycleEvent | undefined {
    const kind = message.kind;
    switch (kind?.$case) {
      case "event": {
        const event = kind.value;
        if (this.lastSequence !== undefined && event.sequence <= this.lastSequence) {
          return undefined;
        }
        this.lastSequence = event.sequence;
        this.nextStart = event.sequence + 1;
        return event;
      }
      case "progress": {
        const head = kind.value.headSequence;
        if (this.nextStart === undefined) {
          if (!this.wantSnapshot) {
            this.nextStart = head + 1;
          }
        } else if (head + 1 > this.nextStart) {
          this.nextStart = head + 1;
        }
        return undefined;
      }
      case "snapshotAgent":
        this.pending.push(kind.value);
        return undefined;
      case "snapshotComplete":
        if (this.snapshot === undefined) {
          this.snapshot = this.pending;
          this.pending = [];
          this.snapshotHead = kind.value.headSequence;
          this.nextStart = this.snapshotHead + 1;
        }
        return undefined;
      default:
        return undefined;
    }
  }
}
