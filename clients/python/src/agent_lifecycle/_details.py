"""The google.rpc details of an error, read from the `grpc-status-details-bin`
trailer.

The server sends a serialized `google.rpc.Status` whose `details` hold
`ErrorInfo`, `RetryInfo`, `PreconditionFailure` and `BadRequest`. These few
messages are decoded here from the protobuf wire format directly, so that
the package needs no googleapis protos and registers nothing in the default
descriptor pool (where it could clash with another package's copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_TYPE_PREFIX = "type.googleapis.com/google.rpc."


@dataclass(frozen=True)
class Violation:
    """One entry of a PreconditionFailure (type, subject, description) or of
    a BadRequest (field in `subject`, description)."""

    type: str
    subject: str
    description: str


@dataclass
class Details:
    """What the trailer said; empty when it was absent or unreadable."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    precondition_violations: list[Violation] = field(default_factory=list)
    field_violations: list[Violation] = field(default_factory=list)


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints, bytes for
    length-delimited fields; fixed-width fields are skipped."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _Malformed("truncated field")
            out.append((number, data[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"wire type {wire}")
    return out


def _text(value: int | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _error_info(data: bytes, into: Details) -> None:
    for number, value in _fields(data):
        if number == 1:
            into.reason = _text(value)
        elif number == 2:
            into.domain = _text(value)
        elif number == 3 and isinstance(value, bytes):
            entry = dict(_fields(value))
            into.metadata[_text(entry.get(1, b""))] = _text(entry.get(2, b""))


def _retry_info(data: bytes, into: Details) -> None:
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            seconds = 0
            nanos = 0
            for n, v in _fields(value):
                if n == 1 and isinstance(v, int):
                    seconds = _signed(v)
                elif n == 2 and isinstance(v, int):
                    nanos = _signed(v)
            into.retry_delay = max(0.0, seconds + nanos / 1e9)


def _violations(data: bytes, width: int) -> list[Violation]:
    out = []
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            parts = dict(_fields(value))
            texts = [_text(parts.get(i, b"")) for i in range(1, width + 1)]
            if width == 3:
                out.append(Violation(texts[0], texts[1], texts[2]))
            else:
                out.append(Violation("FIELD", texts[0], texts[1]))
    return out


def parse(status: bytes | None) -> Details:
    """The details of a serialized google.rpc.Status (an unreadable one
    gives empty details rather than hiding the error it came with)."""
    details = Details()
    if not status:
        return details
    try:
        for number, value in _fields(status):
            if number != 3 or not isinstance(value, bytes):
                continue
            parts = dict(_fields(value))
            type_url = _text(parts.get(1, b""))
            payload = parts.get(2, b"")
            if not isinstance(payload, bytes) or not type_url.startswith(_TYPE_PREFIX):
                continue
            kind = type_url[len(_TYPE_PREFIX) :]
            if kind == "ErrorInfo":
                _error_info(payload, details)
            elif kind == "RetryInfo":
                _retry_info(payload, details)
            elif kind == "PreconditionFailure":
                details.precondition_violations += _violations(payload, 3)
            elif kind == "BadRequest":
                details.field_violations += _violations(payload, 2)
    except _Malformed:
        return Details()
    return details
