/**
 * The google.rpc details of an error, read from the
 * `grpc-status-details-bin` trailer: ErrorInfo, RetryInfo,
 * PreconditionFailure and BadRequest, decoded from the protobuf wire format
 * directly (no googleapis protos needed).
 */
import { BinaryReader } from "@bufbuild/protobuf/wire";

/** One PreconditionFailure violation (type, subject, description) or BadRequest one (the field in `subject`). */
export interface Violation {
  type: string;
  subject: string;
  description: string;
}

/** What the trailer said; empty when it was absent or unreadable. */
export interface Details {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
  /** RetryInfo's delay in milliseconds. */
  retryDelayMs: number | undefined;
  preconditionViolations: Violation[];
  fieldViolations: Violation[];
}

const TYPE_PREFIX = "type.googleapis.com/google.rpc.";

export function emptyDetails(): Details {
  return { reason: "", domain: "", metadata: {}, retryDelayMs: undefined, preconditionViolations: [], fieldViolations: [] };
}

/** Calls `each(field, reader)` for every field of `bytes`; `each` must consume the field or return false to skip it. */
function fields(bytes: Uint8Array, each: (field: number, reader: BinaryReader) => boolean): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (!each(field, reader)) {
      reader.skip(wireType);
    }
  }
}

function strings(bytes: Uint8Array): Map<number, string> {
  const out = new Map<number, string>();
  fields(bytes, (field, reader) => {
    if (field >= 1 && field <= 3) {
      out.set(field, reader.string());
      return true;
    }
    return false;
  });
  return out;
}

function violations(bytes: Uint8Array, width: 2 | 3): Violation[] {
  const out: Violation[] = [];
  fields(bytes, (field, reader) => {
    if (field !== 1) {
      return false;
    }
    const parts = strings(reader.bytes());
    out.push(
      width === 3
        ? { type: parts.get(1) ?? "", subject: parts.get(2) ?? "", description: parts.get(3) ?? "" }
        : { type: "FIELD", subject: parts.get(1) ?? "", description: parts.get(2) ?? "" },
    );
    return true;
  });
  return out;
}

function detail(kind: string, payload: Uint8Array, into: Details): void {
  if (kind === "ErrorInfo") {
    fields(payload, (field, reader) => {
      if (field === 1) {
        into.reason = reader.string();
      } else if (field === 2) {
        into.domain = reader.string();
      } else if (field === 3) {
        const entry = strings(reader.bytes());
        into.metadata[entry.get(1) ?? ""] = entry.get(2) ?? "";
      } else {
        return false;
      }
      return true;
    });
  } else if (kind === "RetryInfo") {
    fields(payload, (field, reader) => {
      if (field !== 1) {
        return false;
      }
      let seconds = 0;
      let nanos = 0;
      fields(reader.bytes(), (f, r) => {
        if (f === 1) {
          seconds = Number(r.int64());
        } else if (f === 2) {
          nanos = r.int32();
        } else {
          return false;
        }
        return true;
      });
      into.retryDelayMs = Math.max(0, seconds * 1000 + nanos / 1e6);
      return true;
    });
  } else if (kind === "PreconditionFailure") {
    into.preconditionViolations.push(...violations(payload, 3));
  } else if (kind === "BadRequest") {
    into.fieldViolations.push(...violations(payload, 2));
  }
}

/** The details of a serialized google.rpc.Status (an unreadable one gives empty details). */
export function parseDetails(status: Uint8Array | undefined): Details {
  const out = emptyDetails();
  if (status === undefined || status.length === 0) {
    return out;
  }
  try {
    fields(status, (field, reader) => {
      if (field !== 3) {
        return false;
      }
      let typeUrl = "";
      let payload: Uint8Array = new Uint8Array();
      fields(reader.bytes(), (f, r) => {
        if (f === 1) {
          typeUrl = r.string();
        } else if (f === 2) {
          payload = r.bytes();
        } else {
          return false;
        }
        return true;
      });
      if (typeUrl.startsWith(TYPE_PREFIX)) {
        detail(typeUrl.slice(TYPE_PREFIX.length), payload, out);
      }
      return true;
    });
  } catch {
    return emptyDetails();
  }
  return out;
}
