/**
 * Connection settings: endpoints, TLS, the bearer token, the retry and
 * back-off policy, and which errors are worth another attempt.
 */
import { readFileSync } from "node:fs";

import { ChannelCredentials, type ChannelOptions, status as Status } from "@grpc/grpc-js";

import { type LifecycleError, TooManyWatchesError } from "./errors";

/**
 * How unary calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED (every
 * state-changing call carries a request id, so a retry never applies a change
 * twice): at most `maxAttempts` attempts, waiting RetryInfo's delay when the
 * server sent one, else an exponential back-off from `initialBackoffMs` to
 * `maxBackoffMs` with +-`jitter`. Watches reconnect with the same back-off,
 * without a limit on attempts.
 */
export interface RetryPolicy {
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
  jitter: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 8,
  initialBackoffMs: 100,
  maxBackoffMs: 5000,
  multiplier: 2,
  jitter: 0.2,
};

/** TLS settings, as the CLI's --tls-ca, --tls-client-cert and --tls-client-key (file paths). */
export interface TlsOptions {
  caFile?: string;
  clientCertFile?: string;
  clientKeyFile?: string;
  /** Overrides the name checked in the server's certificate. */
  serverName?: string;
}

/** Channel options: reconnect quickly after a restart, and ping idle connections so a dropped one is noticed. */
export const CHANNEL_OPTIONS: ChannelOptions = {
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2000,
  "grpc.keepalive_time_ms": 20000,
  "grpc.keepalive_timeout_ms": 10000,
  "grpc.keepalive_permit_without_calls": 1,
};

export interface Endpoint {
  target: string;
  tls: boolean;
}

/** `http://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT` (TLS when `tls` is given), as a list or comma-separated. */
export function parseEndpoints(endpoints: string | string[], tls: TlsOptions | undefined): Endpoint[] {
  const items = typeof endpoints === "string" ? endpoints.split(",") : endpoints;
  const out: Endpoint[] = [];
  for (const raw of items) {
    let text = raw.trim();
    if (text === "") {
      continue;
    }
    let secure = tls !== undefined;
    if (text.startsWith("https://")) {
      secure = true;
      text = text.slice("https://".length);
    } else if (text.startsWith("http://")) {
      if (tls !== undefined) {
        throw new Error(`endpoint ${JSON.stringify(raw)} is http:// but TLS settings were given`);
      }
      text = text.slice("http://".length);
    }
    text = text.replace(/\/+$/, "");
    if (text === "" || text.includes("/")) {
      throw new Error(`endpoint ${JSON.stringify(raw)} is not HOST:PORT, http://HOST:PORT or https://HOST:PORT`);
    }
    out.push({ target: text, tls: secure });
  }
  if (out.length === 0) {
    throw new Error("no endpoint given");
  }
  return out;
}

/** The credentials of one endpoint. */
export function credentials(endpoint: Endpoint, tls: TlsOptions | undefined): ChannelCredentials {
  if (!endpoint.tls) {
    return ChannelCredentials.createInsecure();
  }
  const read = (path: string | undefined): Buffer | null => (path ? readFileSync(path) : null);
  if ((tls?.clientCertFile === undefined) !== (tls?.clientKeyFile === undefined)) {
    throw new Error("a client certificate needs both clientCertFile and clientKeyFile");
  }
  return ChannelCredentials.createSsl(read(tls?.caFile), read(tls?.clientKeyFile), read(tls?.clientCertFile));
}

/** The delays of one series of attempts. */
export class Backoff {
  private next: number;
  constructor(private readonly policy: RetryPolicy) {
    this.next = policy.initialBackoffMs;
  }
  reset(): void {
    this.next = this.policy.initialBackoffMs;
  }
  /** The wait before the next attempt: RetryInfo's delay when the error carries one, else the next back-off step. */
  delayMs(error?: LifecycleError): number {
    const step = this.next;
    this.next = Math.min(this.policy.maxBackoffMs, this.next * this.policy.multiplier);
    if (error?.retryDelayMs !== undefined) {
      return error.retryDelayMs;
    }
    const spread = step * this.policy.jitter;
    return Math.max(0, step + (Math.random() * 2 - 1) * spread);
  }
}

/** Errors a unary call may be sent again after. */
export function retryable(error: LifecycleError): boolean {
  return error.code === Status.UNAVAILABLE || error.code === Status.RESOURCE_EXHAUSTED;
}

/** Errors a watch reconnects after: anything but a refusal of the request itself. */
export function watchRetryable(error: LifecycleError): boolean {
  if (error instanceof TooManyWatchesError) {
    return true;
  }
  return [
    Status.UNAVAILABLE,
    Status.RESOURCE_EXHAUSTED,
    Status.INTERNAL,
    Status.UNKNOWN,
    Status.CANCELLED,
    Status.DEADLINE_EXCEEDED,
    Status.ABORTED,
  ].includes(error.code);
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
