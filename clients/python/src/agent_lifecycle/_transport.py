"""Connection settings shared by the sync and asyncio clients: endpoints,
TLS, the bearer token, retry and back-off policy, and which errors are
worth another attempt."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import LifecycleError, TooManyWatchesError

SERVICE = "agentlifecycle.v1.AgentLifecycleService"

#: Channel options: reconnect quickly after a server restart (gRPC's own
#: default waits up to 120 s between attempts) and ping an idle connection so
#: that a silently dropped one is noticed.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class RetryPolicy:
    """How unary calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED
    (every mutating call carries a request_id, so a retry never applies a
    change twice): at most `max_attempts` attempts in all, waiting the
    server's RetryInfo delay when it sent one, else an exponential back-off
    from `initial_backoff` to `max_backoff` seconds with +-`jitter`.
    `RetryPolicy(max_attempts=1)` turns retries off. Watches reconnect with
    the same back-off, without a limit on attempts."""

    max_attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")


class Backoff:
    """The delays of one series of attempts."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._next = policy.initial_backoff

    def reset(self) -> None:
        self._next = self._policy.initial_backoff

    def delay(self, error: LifecycleError | None = None) -> float:
        """The wait before the next attempt: RetryInfo's delay when the
        error carries one, else the next back-off step."""
        step = self._next
        self._next = min(self._policy.max_backoff, self._next * self._policy.multiplier)
        if error is not None and error.retry_delay is not None:
            return error.retry_delay
        spread = step * self._policy.jitter
        return max(0.0, step + random.uniform(-spread, spread))


def retryable(error: LifecycleError) -> bool:
    """Errors a unary call may be sent again after: the server was
    unreachable or busy."""
    return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def watch_retryable(error: LifecycleError) -> bool:
    """Errors a watch reconnects after: anything but a refusal of the request
    itself (bad filter, auth, compaction, ...)."""
    if isinstance(error, TooManyWatchesError):
        return True
    return error.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    )


@dataclass(frozen=True)
class Tls:
    """TLS settings, as the CLI's `--tls-ca`, `--tls-client-cert` and
    `--tls-client-key`: without `ca_file` the server is checked against the
    system roots. `server_name` overrides the name checked in its
    certificate."""

    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("a client certificate needs both client_cert_file and client_key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.client_key_file),
            certificate_chain=_read(self.client_cert_file),
        )


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class Endpoint:
    """One server address and whether it is spoken to over TLS."""

    target: str
    tls: bool


def parse_endpoints(endpoints: str | Sequence[str], tls: Tls | None) -> list[Endpoint]:
    """`http://HOST:PORT` (plaintext), `https://HOST:PORT` (TLS) or
    `HOST:PORT` (TLS when `tls` is given); a string may list several,
    comma-separated."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for raw in items:
        text = raw.strip()
        if not text:
            continue
        secure = tls is not None
        if text.startswith("https://"):
            secure, text = True, text[len("https://") :]
        elif text.startswith("http://"):
            if tls is not None:
                raise ValueError(f"endpoint {raw!r} is http:// but TLS settings were given")
            text = text[len("http://") :]
        text = text.rstrip("/")
        if not text or "/" in text:
            raise ValueError(f"endpoint {raw!r} is not HOST:PORT, http://HOST:PORT or https://HOST:PORT")
        out.append(Endpoint(text, secure))
    if not out:
        raise ValueError("no endpoint given")
    return out


def env_settings() -> tuple[str, str | None, Tls | None]:
    """The CLI's variables: AGENT_LIFECYCLE_SERVER (default
    http://127.0.0.1:50051), AGENT_LIFECYCLE_TOKEN, AGENT_LIFECYCLE_TLS_CA,
    AGENT_LIFECYCLE_TLS_CLIENT_CERT, AGENT_LIFECYCLE_TLS_CLIENT_KEY."""
    server = os.environ.get("AGENT_LIFECYCLE_SERVER") or "http://127.0.0.1:50051"
    token = os.environ.get("AGENT_LIFECYCLE_TOKEN") or None
    ca = os.environ.get("AGENT_LIFECYCLE_TLS_CA") or None
    cert = os.environ.get("AGENT_LIFECYCLE_TLS_CLIENT_CERT") or None
    key = os.environ.get("AGENT_LIFECYCLE_TLS_CLIENT_KEY") or None
    tls = Tls(ca, cert, key) if (ca or cert or key) else None
    return server, token, tls


def channel_options(tls: Tls | None, extra: Sequence[tuple[str, str | int]]) -> list[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    options += list(extra)
    return options
