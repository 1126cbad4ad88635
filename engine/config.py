"""Channel configuration: `channels/*.yaml` in, frozen typed values out.

Config fails at start-up, completely and with a location: every problem in every file is
collected and reported as `file:line:col: dotted.path: what is wrong`, so an operator fixes a
config in one pass. `koppel check` and `koppel run` both call `load_config`.

The YAML is composed into nodes (which carry line/column marks) and walked against the
expected shape; it is never turned into loose dicts first. A value object is built only
when everything under it is valid, so the cross-file checks (global destination names,
shared queues, listen ports, route targets) see only values that are themselves correct.
Starting a reactor is not needed: endpoint strings are checked by a small parser that
follows Twisted's endpoint string syntax.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from engine.core import charsets
from engine.core.hl7message import Message
from engine.core.paths import PathError
from engine.core.routing import FieldCondition, conditions_hold

from engine.core.units import parse_duration, parse_size

__all__ = [
    "KNOWN_CHARSETS",
    "AcceptConfig",
    "AckConfig",
    "ChannelConfig",
    "ConfigError",
    "ConfigProblem",
    "DestinationConfig",
    "EngineConfig",
    "OnNakConfig",
    "RetryConfig",
    "RouteConfig",
    "SourceConfig",
    "load_config",
    "queue_key_of",
    "server_port_of",
]

# HL7 MSH-18 names a channel or destination may name: the table engine.core.charsets reads.
KNOWN_CHARSETS = frozenset(charsets.HL7_CHARSETS)
NakAction = Literal["retry", "dead-letter"]
NAK_ACTIONS: tuple[NakAction, ...] = ("retry", "dead-letter")
Order = Literal["fifo", "none"]
ORDERS: tuple[Order, ...] = ("fifo", "none")
# keep: one persistent connection; per-message: closed after each answer, as systems that take
# one message per connection expect (Mirth's "Keep Connection Open: No")
Connection = Literal["keep", "per-message"]
CONNECTIONS: tuple[Connection, ...] = ("keep", "per-message")
ACK_MODES = ("on-store", "on-map")
STORE_FAILURE_CODES = ("AE", "AR")
ACCEPT_ACK_POLICIES = ("as-asked", "always")
PROCESSING_IDS = ("P", "T", "D")  # HL7 table 0103

# MSH fields a destination may not rewrite: the delimiters (1, 2), what the message is (9),
# its identity (10, which the ACK's MSA-2 must echo), its version (12), and its charset (18:
# set the destination's `charset`, which also re-encodes the bytes).
_REWRITE_FORBIDDEN = {
    9: "the message type is what the message is",
    10: "the control id must stay the one the ACK echoes in MSA-2",
    12: "the version describes the message's layout",
    18: "set the destination's charset instead, which also re-encodes the bytes",
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TYPE_RE = re.compile(r"[A-Z][A-Z0-9]{2}(\^[A-Z0-9]{3})?")
_VERSION_RE = re.compile(r"2\.[0-9]+(\.[0-9]+)?")
_REWRITE_FIELD_RE = re.compile(r"MSH-([1-9][0-9]?)")
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_FRAME_TIMEOUT = 30.0
DEFAULT_CHARSET = "8859/1"
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_DUPLICATE_WINDOW = 24 * 3600.0
DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 60.0  # seconds idle before TCP keepalive probes; below common firewall timeouts
MAX_KEEPALIVE = 32767  # Linux refuses a longer TCP_KEEPIDLE
DEFAULT_GIVE_UP_AFTER = 72 * 3600.0
DEFAULT_MAX_QUEUE = 1_000_000


# ---------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One thing wrong with the config, where it is and why.

    `line`/`col` are 1-based; they are None only for problems that have no place in a file
    (a missing or empty directory).
    """

    file: str
    line: int | None
    col: int | None
    path: str
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.path}: {self.message}"
        if self.col is None:
            return f"{self.file}:{self.line}: {self.path}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; `problems` lists everything that is wrong, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# ---------------------------------------------------------------------------------------
# Endpoint strings (Twisted syntax, parsed without Twisted so no reactor is involved)


def _split_endpoint(text: str) -> tuple[str, list[str], dict[str, str]]:
    """Split like twisted.internet.endpoints._parse: ':' separates, '\\' escapes, 'k=v'."""
    tokens: list[list[str]] = [[""]]
    allowed_ops = ":="
    chars = iter(text)
    for char in chars:
        if char == ":" and ":" in allowed_ops:
            tokens.append([""])
            allowed_ops = ":="
        elif char == "=" and "=" in allowed_ops:
            tokens[-1].append("")
            allowed_ops = ":"
        elif char == "\\":
            tokens[-1][-1] += next(chars, "")
        else:
            tokens[-1][-1] += char
    scheme = tokens[0][0] if len(tokens[0]) == 1 else ""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for token in tokens[1:]:
        if len(token) == 1:
            args.append(token[0])
        else:
            kwargs[token[0]] = token[1]
    return scheme, args, kwargs


def _port(text: str, *, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        low = 0 if allow_zero else 1
        raise ValueError(f"port {text!r} is not a number from {low} to 65535")
    return int(text)


# The files and directories a TLS endpoint names, by (scheme, server side?): checked when a
# channel file is read, so `koppel check` and a reload catch a missing key, not the listener's
# start. Relative paths are from the working directory, as Twisted opens them.
_TLS_PATHS: dict[tuple[str, bool], dict[str, str]] = {
    ("ssl", True): {"privateKey": "file", "certKey": "file", "extraCertChain": "file", "dhParameters": "file"},
    ("ssl", False): {"privateKey": "file", "certKey": "file", "caCertsDir": "directory"},
    ("tls", False): {"privateKey": "file", "certificate": "file", "trustRoots": "directory"},
}


def _check_tls_paths(endpoint: str, scheme: str, kwargs: dict[str, str], *, server: bool) -> None:
    if scheme == "ssl" and server and "privateKey" not in kwargs:
        raise ValueError(f"listen endpoint {endpoint!r} needs privateKey=PATH "
                         "(PEM key, and the certificate too unless certKey=PATH names it)")
    for option, kind in _TLS_PATHS.get((scheme, server), {}).items():
        value = kwargs.get(option)
        if value is None:
            continue
        path = Path(value)
        if not (path.is_dir() if kind == "directory" else path.is_file()):
            where = "" if path.is_absolute() else " (relative to the working directory)"
            raise ValueError(f"endpoint {endpoint!r}: {option}={value}: no such {kind}{where}")


def server_port_of(listen: str) -> int:
    """Check a Twisted server endpoint string (tcp:/ssl:) and return its port (0 = any free)."""
    example = "e.g. tcp:2575 or tcp:2575:interface=0.0.0.0"
    scheme, args, kwargs = _split_endpoint(listen)
    if scheme not in ("tcp", "ssl"):
        raise ValueError(f"listen endpoint {listen!r} must start with tcp: or ssl:, {example}")
    if "port" in kwargs:
        port = kwargs["port"]
    elif args:
        port = args[0]
    else:
        raise ValueError(f"listen endpoint {listen!r} has no port, {example}")
    return _port(port, allow_zero=True)


def _client_endpoint_parts(endpoint: str) -> tuple[str, str, int, tuple[tuple[str, str], ...]]:
    """Return (scheme, host, port, other options) of a tcp:/ssl:/tls: client endpoint string."""
    example = "e.g. tcp:host=10.1.2.3:port=6661 or tls:host=his.example:port=6661"
    scheme, args, kwargs = _split_endpoint(endpoint)
    if scheme not in ("tcp", "ssl", "tls"):
        raise ValueError(f"endpoint {endpoint!r} must start with tcp:, ssl: or tls:, {example}")
    kwargs = dict(kwargs)
    if len(args) > 2:
        raise ValueError(f"endpoint {endpoint!r} has too many positional parts, {example}")
    if len(args) == 2:
        kwargs.setdefault("host", args[0])
        kwargs.setdefault("port", args[1])
    elif len(args) == 1:
        kwargs.setdefault("port" if "host" in kwargs else "host", args[0])
    host = kwargs.pop("host", "")
    port = kwargs.pop("port", None)
    if not host:
        raise ValueError(f"endpoint {endpoint!r} has no host, {example}")
    if port is None:
        raise ValueError(f"endpoint {endpoint!r} has no port, {example}")
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"endpoint {endpoint!r}: {host!r} is not a host name or IP address") from None
        host = host.lower().rstrip(".")
    return scheme, host, _port(port, allow_zero=False), tuple(sorted(kwargs.items()))


def queue_key_of(endpoint: str) -> str:
    """The queue identity of a client endpoint: "host:port", host lower-cased ("[v6]:port").

    Every destination whose endpoint reaches the same host:port shares one ordered queue
    and one connection.
    """
    _, host, port, _ = _client_endpoint_parts(endpoint)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------
# Values


def _types_match(types: frozenset[str] | None, msg_type: str, trigger: str) -> bool:
    return types is None or msg_type in types or f"{msg_type}^{trigger}" in types


# PyYAML's words for the mistakes people make most, in theirs.
_YAML_HINTS = {
    "mapping values are not allowed here": "; usually a key indented deeper than the one before it, "
                                           "or a value holding ': ' that needs quotes",
    "could not find expected ':'": "; usually a key without ':' or a line indented less than its neighbours",
}


def types_cover(types: Iterable[str] | None, named: str) -> bool:
    """Whether a list of types (``accept.types``, a route's, a mapping's; None: any) takes the
    type ``named``: ``TYPE^TRIGGER`` when it lists that or the bare ``TYPE``; a bare ``TYPE``
    when it lists any trigger of it."""
    msg_type, _, trigger = named.partition("^")
    return _types_match(types, msg_type, trigger) or (  # type: ignore[arg-type]
        not trigger and any(t.partition("^")[0] == msg_type for t in types))  # type: ignore[union-attr]


def unreachable_route_types(channel: "ChannelConfig") -> list[tuple[int, str]]:
    """(route index, type) for each type a route names that the channel's ``accept.types``
    refuses: the route can never take it (a refused message is answered AR before routing)."""
    accepted = channel.accept.types
    if not accepted:
        return []
    return [(index, named) for index, route in enumerate(channel.routes)
            for named in sorted(route.types or ()) if not types_cover(accepted, named)]


def unrouted_types(channel: "ChannelConfig") -> list[str]:
    """The types a channel lists in ``accept`` that none of its routes takes (whatever their
    field conditions): such a message is answered AA and stored as filtered, which a sender
    pointed at the wrong channel never hears of. Empty when the channel lists no types or
    has no routes at all (a channel that only stores)."""
    if not channel.accept.types or not channel.routes:
        return []
    return [accepted for accepted in sorted(channel.accept.types)  # (a route without types takes all)
            if not any(types_cover(route.types, accepted) for route in channel.routes)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def peer_allowed(allow: tuple[_IPNetwork, ...] | None, host: str) -> bool:
    """Whether a peer address may connect (None: any; IPv4-mapped IPv6 peers count as IPv4)."""
    if allow is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """Where a channel listens and what it tolerates from the peers that connect."""

    listen: str
    allow: tuple[_IPNetwork, ...] | None = None  # None: any peer may connect
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT  # None: never
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    charset: str = DEFAULT_CHARSET  # HL7 MSH-18 name used when a message's MSH-18 is empty
    lenient_framing: bool = False
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    keepalive: float | None = DEFAULT_KEEPALIVE  # None: no TCP keepalive probes
    port: int = field(init=False)  # from `listen`; 0 = any free port

    def __post_init__(self) -> None:
        object.__setattr__(self, "port", server_port_of(self.listen))
        _check(self.max_message_bytes > 0, "max_message_bytes must be more than 0")
        _check(self.idle_timeout is None or self.idle_timeout > 0, "idle_timeout must be more than 0 or None")
        _check(self.frame_timeout > 0, "frame_timeout must be more than 0")
        _check(self.charset in KNOWN_CHARSETS, f"unknown charset {self.charset!r}")
        _check(self.max_connections > 0, "max_connections must be more than 0")
        _check(self.keepalive is None or self.keepalive >= 1, "keepalive must be at least 1s or None")

    def peer_allowed(self, host: str) -> bool:
        return peer_allowed(self.allow, host)


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptConfig:
    """Which messages a channel takes; None means "any" (processing id: not checked)."""

    types: frozenset[str] | None = None  # "SRM^S01" (exact) or "SRM" (any trigger)
    versions: frozenset[str] | None = None
    processing_ids: frozenset[str] | None = None

    def type_accepted(self, msg_type: str, trigger: str) -> bool:
        return _types_match(self.types, msg_type, trigger)

    def version_accepted(self, version: str) -> bool:
        return self.versions is None or version in self.versions

    def processing_id_accepted(self, processing_id: str) -> bool:
        return self.processing_ids is None or processing_id in self.processing_ids


@dataclass(frozen=True, slots=True, kw_only=True)
class AckConfig:
    """When the source gets its ACK, and what it gets when the store cannot commit.

    `store_failure` is the original-mode code; enhanced mode answers CE/CR for AE/AR.
    """

    mode: Literal["on-store", "on-map"] = "on-store"
    store_failure: Literal["AE", "AR"] = "AE"
    # What a message the channel refuses for what it is gets (a type, trigger, version or
    # processing id it does not take, an unreadable header, a batch, too large; on-map: no
    # route takes it). HL7 says AR, but AR also means "receiver problem, try again" and some
    # senders retry it for ever: AE makes them stop. Enhanced mode: CR or CE.
    rejected: Literal["AE", "AR"] = "AR"
    # MSH-15 NE/ER/SU withhold the accept ACK as HL7 says (as-asked); `always` answers every
    # message, for senders with NE in their header template that still wait for an answer.
    accept_ack: Literal["as-asked", "always"] = "as-asked"

    def __post_init__(self) -> None:
        _check(self.mode in ACK_MODES, f"unknown ack mode {self.mode!r}")
        _check(self.store_failure in STORE_FAILURE_CODES, "store_failure must be AE or AR")
        _check(self.rejected in STORE_FAILURE_CODES, "rejected must be AE or AR")
        _check(self.accept_ack in ACCEPT_ACK_POLICIES, "accept_ack must be as-asked or always")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Backoff between delivery attempts: initial * factor**n, capped at max, +/- jitter."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 300.0
    jitter: float = 0.2  # fraction of the delay, 0..1

    def __post_init__(self) -> None:
        _check(self.initial > 0, "retry.initial must be more than 0")
        _check(self.factor >= 1, "retry.factor must be at least 1")
        _check(self.max >= self.initial, "retry.max must be at least retry.initial")
        _check(0 <= self.jitter <= 1, "retry.jitter must be from 0 to 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class OnNakConfig:
    """What a negative ACK code from a destination does to the message."""

    AE: NakAction = "retry"
    CE: NakAction = "retry"
    AR: NakAction = "dead-letter"
    CR: NakAction = "dead-letter"

    def __post_init__(self) -> None:
        for code in ("AE", "CE", "AR", "CR"):
            _check(getattr(self, code) in NAK_ACTIONS, f"on_nak.{code} must be retry or dead-letter")

    def action(self, ack_code: str) -> NakAction:
        """The action for AE/CE/AR/CR; raises KeyError for anything else (AA/CA are not NAKs)."""
        if ack_code not in ("AE", "CE", "AR", "CR"):
            raise KeyError(ack_code)
        return getattr(self, ack_code)


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationConfig:
    """A system messages are delivered to. Names are global across channel files."""

    name: str
    endpoint: str  # Twisted client endpoint string (tcp:, ssl:, tls:)
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retry: RetryConfig = RetryConfig()
    give_up_after: float | None = DEFAULT_GIVE_UP_AFTER  # None: never dead-letter on time
    on_nak: OnNakConfig = OnNakConfig()
    max_queue: int = DEFAULT_MAX_QUEUE
    rewrite: tuple[tuple[str, str], ...] = ()  # ("MSH-5", "HIX"), sorted by field number
    charset: str | None = None  # re-encode outbound to this HL7 charset; None = as received
    order: Order = "fifo"
    parallel: int = 1  # > 1 only with order "none"
    connection: Connection = "keep"
    keepalive: float | None = DEFAULT_KEEPALIVE  # None: no TCP keepalive probes
    queue_key: str = field(init=False)  # "host:port" from `endpoint`

    def __post_init__(self) -> None:
        object.__setattr__(self, "queue_key", queue_key_of(self.endpoint))
        _check(self.ack_timeout > 0, "ack_timeout must be more than 0")
        _check(self.connect_timeout > 0, "connect_timeout must be more than 0")
        _check(
            self.give_up_after is None or self.give_up_after > 0, "give_up_after must be more than 0 or None"
        )
        _check(self.max_queue > 0, "max_queue must be more than 0")
        _check(self.charset is None or self.charset in KNOWN_CHARSETS, f"unknown charset {self.charset!r}")
        _check(self.order in ORDERS, "order must be fifo or none")
        _check(self.connection in CONNECTIONS, "connection must be keep or per-message")
        _check(self.parallel >= 1, "parallel must be at least 1")
        _check(self.keepalive is None or self.keepalive >= 1, "keepalive must be at least 1s or None")
        _check(self.parallel == 1 or self.order == "none", "parallel > 1 needs order none")


# Settings of the one connection behind a queue key; destinations sharing it must agree.
# One queue, one connection and one depth limit: destinations sharing a host:port must agree.
_CONNECTION_SETTINGS = (
    "ack_timeout", "connect_timeout", "retry", "order", "parallel", "charset", "max_queue", "connection",
    "keepalive",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """If `types` matches (None: all): send what a channel received to `to` as it is, and/or
    map it with the mapping named `map` (which builds its own outbound messages)."""

    to: tuple[str, ...]
    types: frozenset[str] | None = None  # YAML: when: {types: [...]}, same shape as accept.types
    map: str | None = None  # a mapping name from mappings/*.yaml
    fields: tuple[FieldCondition, ...] = ()  # YAML: when: {fields: {PATH: value(s)}}: all hold
    unless: tuple[FieldCondition, ...] = ()  # YAML: when: {unless: {PATH: value(s)}}: none holds

    def matches(self, msg_type: str, trigger: str) -> bool:
        """The types alone (what a route may take, before its field conditions)."""
        return _types_match(self.types, msg_type, trigger)

    def takes(self, msg_type: str, trigger: str, message: Callable[[], Message]) -> bool:
        """The types match and the field conditions hold; ``message`` gives the parsed
        message, called only when the route has field conditions (see routing.parsed_once)."""
        if not self.matches(msg_type, trigger):
            return False
        return not (self.fields or self.unless) or conditions_hold(self.fields, self.unless, message())


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelConfig:
    """One inbound channel: one listener and what happens to what it receives."""

    name: str
    file: Path | None = None  # the YAML file it came from
    source: SourceConfig
    accept: AcceptConfig = AcceptConfig()
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW  # seconds; 0 disables duplicate detection
    ack: AckConfig = AckConfig()
    routes: tuple[RouteConfig, ...] = ()
    # Where checks made later (mapping names, after mappings load) point: dotted path -> (line, col).
    marks: tuple[tuple[str, int, int], ...] = ()

    def mark(self, path: str) -> tuple[int | None, int | None]:
        for where, line, col in self.marks:
            if where == path:
                return line, col
        return None, None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Everything in channels/: channels in file-name order, destinations by name."""

    channels: tuple[ChannelConfig, ...]
    destinations: tuple[DestinationConfig, ...] = ()

    def channel(self, name: str) -> ChannelConfig:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)

    def destination(self, name: str) -> DestinationConfig:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Walking YAML nodes (channel, mapping, template and agenda files alike)

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"
_T = TypeVar("_T")
_Reader = Callable[[yaml.Node, str], _T]
_Entry = tuple[yaml.Node, yaml.Node]  # (key node, value node)


class _Invalid(Exception):
    """A value is wrong; whoever asked for it reports it at the value's node."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


_REQUIRED: Any = _Required()


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _is_plain_key(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag not in (_NULL, _MERGE)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing"
    return repr(node.value)


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _list(node: yaml.Node, example: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise _Invalid(f"expected a list, e.g. {example}, got {_kind(node)}")
    return node.value


def _merged(node: yaml.MappingNode, bad: list[yaml.Node]) -> dict[str, _Entry]:
    """Entries brought in by YAML merge keys (`<<: *defaults`), with YAML's precedence:
    a mapping's own keys beat what it merges, and earlier merged mappings beat later ones.
    Merged values that are not mappings are put in `bad`."""
    merged: dict[str, _Entry] = {}
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE:
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                bad.append(source)
                continue
            for key, entry in _entries(source, bad).items():
                merged.setdefault(key, entry)
    return merged


def _entries(node: yaml.Node, bad: list[yaml.Node] | None = None) -> dict[str, _Entry]:
    """A mapping's entries as YAML loads them (merges applied), reporting nothing, so a reader
    can tell which shape a node has before it reads it. {} for anything but a mapping."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    entries = _merged(node, [] if bad is None else bad)
    entries.update((k.value, (k, v)) for k, v in node.value if _is_plain_key(k))
    return entries


class _Mapping:
    """The checked keys of one YAML mapping, read by name with a reader per value."""

    def __init__(self, walker: _Walker, node: yaml.MappingNode, path: str, entries: dict[str, _Entry]):
        self.walker = walker
        self.node = node
        self.path = path
        self.entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> yaml.Node:
        """The value node of `key`, for readers that check it themselves."""
        return self.entries[key][1]

    def get(self, key: str, read: _Reader[_T], default: Any = _REQUIRED) -> Any:
        """The value of `key` read by `read`; `default` if absent. Problems are reported."""
        path = _join(self.path, key)
        entry = self.entries.get(key)
        if entry is None:
            if default is _REQUIRED:
                self.walker.report(self.node, path, "missing (required)")
                return None
            return default
        return self.walker.read(entry[1], path, read, None if default is _REQUIRED else default)

    def items(self) -> Iterable[tuple[str, yaml.Node, yaml.Node]]:
        for key, (key_node, value_node) in self.entries.items():
            yield key, key_node, value_node


class _Walker:
    """Reads one file's node tree against the expected shape, collecting every problem."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def report(self, node: yaml.Node, path: str, message: str, *, col_offset: int = 0) -> None:
        """`col_offset`: how far into the node's text the problem is (a bad character in a value)."""
        mark = node.start_mark
        self.problems.append(
            ConfigProblem(
                file=self.file,
                line=mark.line + 1,
                col=mark.column + 1 + col_offset,
                path=path or "(top)",
                message=message,
            )
        )

    def read(self, node: yaml.Node, path: str, read: _Reader[_T], default: Any = None) -> Any:
        """`node` read by `read`, or `default` once the problem is reported."""
        try:
            return read(node, path)
        except _Invalid as invalid:
            self.report(node, path, str(invalid))
            return default

    def mapping(self, node: yaml.Node, path: str, keys: Sequence[str] | None) -> _Mapping | None:
        """Check that `node` is a mapping with only `keys` (None: any keys), each once."""
        if not isinstance(node, yaml.MappingNode):
            expected = f" with keys {', '.join(keys)}" if keys else ""
            self.report(node, path, f"expected a mapping{expected}, got {_kind(node)}")
            return None
        bad: list[yaml.Node] = []
        entries = _merged(node, bad)
        for source in bad:
            self.report(source, _join(path, "<<"), f"can only merge a mapping, got {_kind(source)}")
        explicit: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL:
                self.report(key_node, path, f"a key must be a plain name, got {_kind(key_node)}")
                continue
            key = key_node.value
            key_path = _join(path, key)
            if key in explicit:
                first = entries[key][0].start_mark.line + 1
                self.report(key_node, key_path, f"duplicate key (first at line {first})")
            elif keys is not None and key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]}?" if close else f"expected one of: {', '.join(keys)}"
                self.report(key_node, key_path, f"unknown key; {hint}")
            else:
                explicit.add(key)
                entries[key] = (key_node, value_node)
        for key, (key_node, _) in list(entries.items()):
            if keys is not None and key not in keys:  # came in through a merge key
                self.report(key_node, _join(path, key), f"unknown key; expected one of: {', '.join(keys)}")
                del entries[key]
        return _Mapping(self, node, path, entries)

    def nodes(self, node: yaml.Node, path: str, *, example: str) -> list[yaml.Node]:
        """A list's item nodes, for a caller that checks each item itself; [] if not a list."""
        return self.read(node, path, lambda n, p: _list(n, example), [])

    def seq(
        self,
        node: yaml.Node,
        path: str,
        read: _Reader[_T],
        *,
        example: str,
        empty: str | None = None,
        unique: bool = True,
    ) -> tuple[_T, ...]:
        """Read a list item by item; each bad item is reported at its own index.

        `empty`, if given, is why an empty list is refused ("would refuse every peer").
        """
        items = _list(node, example)
        if empty is not None and not items:
            raise _Invalid(empty)
        out: list[_T] = []
        seen: dict[Any, int] = {}
        for index, item in enumerate(items):
            item_path = _join(path, index)
            try:
                value = read(item, item_path)
            except _Invalid as invalid:
                self.report(item, item_path, str(invalid))
                continue
            if unique and value in seen:
                self.report(item, item_path, f"listed twice (also at [{seen[value]}])")
                continue
            if unique:
                seen[value] = index
            out.append(value)
        return tuple(out)

    def filter_set(
        self, node: yaml.Node, path: str, read: _Reader[str], *, example: str, meaning: str
    ) -> frozenset[str]:
        """A non-empty list read as a set: an empty filter is a mistake, not "nothing"."""
        empty = f"an empty list would {meaning}; leave the key out instead"
        return frozenset(self.seq(node, path, read, example=example, empty=empty))


# Scalar readers: (node, path) -> value, raising _Invalid with what is expected.


def _text(node: yaml.Node, path: str = "") -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _Invalid(f"expected a single value, got {_kind(node)}")
    if node.tag == _NULL:
        raise _Invalid("needs a value")
    return node.value


def _pattern(node: yaml.Node, path: str = "") -> str:
    """A route condition's text: as written (``0320`` stays ``0320``); ``""`` is an empty field."""
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
        raise _Invalid('needs a value (write "" for an empty field)')
    return _text(node)


def _nullable(read: _Reader[_T]) -> _Reader[_T | None]:
    def read_or_none(node: yaml.Node, path: str) -> _T | None:
        if _is_null(node):
            return None
        return read(node, path)

    return read_or_none


def _name(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if not _NAME_RE.fullmatch(value):
        raise _Invalid(f"{value!r} is not a valid name: use letters, digits, '-', '_', '.' (at most 64)")
    return value


def _choice(*options: str) -> _Reader[str]:
    def read(node: yaml.Node, path: str) -> str:
        value = _text(node)
        if value not in options:
            raise _Invalid(f"{value!r} is not one of: {', '.join(options)}")
        return value

    return read


def _bool(node: yaml.Node, path: str) -> bool:
    value = _text(node)
    if node.tag != _BOOL or value.lower() not in ("true", "false"):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def _int(minimum: int) -> _Reader[int]:
    def read(node: yaml.Node, path: str) -> int:
        value = _text(node)
        if not re.fullmatch(r"[0-9]+(_[0-9]+)*", value):  # 1_000_000 yes; 1_ and 1__0 no
            raise _Invalid(f"expected a whole number, got {value!r}")
        number = int(value)
        if number < minimum:
            raise _Invalid(f"must be at least {minimum}, got {number}")
        return number

    return read


def _number(minimum: float, maximum: float | None = None) -> _Reader[float]:
    def read(node: yaml.Node, path: str) -> float:
        value = _text(node)
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
            raise _Invalid(f"expected a number, got {value!r}")
        number = float(value)
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"at least {minimum:g}"
            raise _Invalid(f"must be {bounds}, got {value}")
        return number

    return read


def _size(node: yaml.Node, path: str) -> int:
    try:
        size = parse_size(_text(node))
    except ValueError as error:
        raise _Invalid(str(error)) from None
    if size < 1:
        raise _Invalid("must be more than 0 bytes")
    return size


def _duration(*, allow_never: bool = False, allow_zero: bool = False) -> _Reader[float | None]:
    def read(node: yaml.Node, path: str) -> float | None:
        try:
            seconds = parse_duration(_text(node), allow_never=allow_never)
        except ValueError as error:
            raise _Invalid(str(error)) from None
        if seconds == 0 and not allow_zero:
            raise _Invalid("must be more than 0" + (" (use never to switch it off)" if allow_never else ""))
        return seconds

    return read


def _keepalive(node: yaml.Node, path: str) -> float | None:
    """``60s`` (idle time before the first probe), or ``off``."""
    value = _text(node)
    if value.lower() in ("off", "false", "never"):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        raise _Invalid(f"{error}; or off") from None
    if seconds is None or seconds < 1:
        raise _Invalid("must be at least 1s (the kernel counts whole seconds), or off")
    if seconds > MAX_KEEPALIVE:
        raise _Invalid(f"must be at most {MAX_KEEPALIVE}s (9h6m7s, the longest idle Linux takes), or off")
    return seconds


def _charset(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if value not in KNOWN_CHARSETS:
        known = ", ".join(sorted(KNOWN_CHARSETS, key=lambda c: (c[:1].isdigit(), len(c), c)))
        raise _Invalid(f"unknown HL7 charset {value!r}; known: {known}")
    return value


def _network(node: yaml.Node, path: str) -> _IPNetwork:
    value = _text(node)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP network like 10.20.0.0/16 or an address") from None
    raise _Invalid(f"{value!r} has host bits set; did you mean {loose}?")


def _message_type(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if not _TYPE_RE.fullmatch(value):
        raise _Invalid(f"{value!r} is not a message type like SRM^S01 or SRM (any trigger)")
    return value


def _version(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if not _VERSION_RE.fullmatch(value):
        raise _Invalid(f"{value!r} is not an HL7 v2 version like \"2.5.1\"")
    return value


def _listen(node: yaml.Node, path: str) -> str:
    value = _text(node)
    try:
        server_port_of(value)
        scheme, _, options = _split_endpoint(value)
        _check_tls_paths(value, scheme, options, server=True)
        _twisted_accepts(value, server=True)
    except ValueError as error:
        raise _Invalid(str(error)) from None
    return value


def _client_endpoint(node: yaml.Node, path: str) -> str:
    value = _text(node)
    try:
        queue_key_of(value)
        scheme, _, options = _split_endpoint(value)
        if scheme == "ssl":
            # Twisted's ssl: client checks no certificate without caCertsDir, and never the
            # host name: patient data would go to whoever answers on the path.
            raise ValueError(f"endpoint {value!r}: ssl: does not check the destination's certificate and host "
                             "name; use tls:HOST:PORT (trustRoots=DIR for a private CA)")
        _check_tls_paths(value, scheme, options, server=False)
        _twisted_accepts(value, server=False)
    except ValueError as error:
        raise _Invalid(str(error)) from None
    return value


# Options Twisted's endpoint parsers take, per scheme (tcp: is checked by the parser itself;
# for TLS the parser would also load the key and certificates, which is the engine's job).
_TLS_OPTIONS = {
    ("ssl", True): {"port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
                    "dhParameters"},
    ("ssl", False): {"host", "port", "timeout", "bindAddress", "certKey", "privateKey", "caCertsDir"},
    ("tls", False): {"host", "port", "timeout", "bindAddress", "certificate", "privateKey", "trustRoots",
                     "endpoint"},
}


def _twisted_accepts(endpoint: str, *, server: bool) -> None:
    """An option Twisted does not know (timeot=5, interfce=...) is a located config error
    now, not a failed connect or a failed listen later."""
    scheme, _, options = _split_endpoint(endpoint)
    known = _TLS_OPTIONS.get((scheme, server))
    if known is not None:
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"endpoint {endpoint!r}: unknown option {unknown[0]!r}; "
                             f"{scheme}: takes {', '.join(sorted(known))}")
        return
    from twisted.internet.endpoints import clientFromString, serverFromString
    from twisted.internet.testing import MemoryReactor

    try:  # tcp: let Twisted's own parser build it, on a reactor that never runs
        (serverFromString if server else clientFromString)(MemoryReactor(), endpoint)
    except Exception as error:  # noqa: BLE001 - whatever Twisted refuses, said in one line
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ValueError(f"endpoint {endpoint!r} is not one Twisted accepts: {detail}") from None


# ---------------------------------------------------------------------------------------
# The channel file shape

_CHANNEL_KEYS = ("name", "source", "accept", "duplicates", "ack", "destinations", "routes")
_SOURCE_KEYS = (
    "listen", "allow", "max_message_bytes", "idle_timeout", "frame_timeout", "charset", "lenient_framing",
    "max_connections", "keepalive",
)  # fmt: skip
_DESTINATION_KEYS = (
    "endpoint", "ack_timeout", "connect_timeout", "retry", "give_up_after", "on_nak", "max_queue", "rewrite",
    "charset", "order", "parallel", "connection", "keepalive",
)  # fmt: skip


@dataclass(slots=True, kw_only=True)
class _Located:
    """A value and where it was written, for problems that compare across files."""

    value: Any
    node: yaml.Node
    file: str
    path: str
    name: str = ""

    def where(self) -> str:
        mark = self.node.start_mark
        return f"{self.file}:{mark.line + 1}:{mark.column + 1}"


@dataclass(slots=True, kw_only=True)
class _FileResult:
    channel: ChannelConfig | None = None
    name: _Located | None = None
    listen_port: _Located | None = None
    destinations: list[_Located] = field(default_factory=list)  # value: DestinationConfig | None
    route_targets: list[_Located] = field(default_factory=list)  # value: destination name
    route_maps: list[_Located] = field(default_factory=list)  # value: mapping name


class _ChannelReader(_Walker):
    def __init__(self, file: Path, display: str) -> None:
        super().__init__(display)
        self.path = file
        self.result = _FileResult()

    def clean_since(self, count: int) -> bool:
        return len(self.problems) == count

    def channel(self, root: yaml.Node) -> None:
        start = len(self.problems)
        top = self.mapping(root, "", _CHANNEL_KEYS)
        if top is None:
            return
        name = top.get("name", _name)
        if name is not None:
            self.result.name = _Located(value=name, node=top.entries["name"][1], file=self.file, path="name")
        source = top.get("source", self.source)
        accept = top.get("accept", _nullable(self.accept), AcceptConfig()) or AcceptConfig()
        duplicate_window = top.get("duplicates", self.duplicates, DEFAULT_DUPLICATE_WINDOW)
        ack = top.get("ack", self.ack, AckConfig())
        top.get("destinations", self.destinations, None)
        routes = top.get("routes", self.routes, ())
        if self.clean_since(start) and source is not None and name is not None:
            self.result.channel = ChannelConfig(
                name=name,
                file=self.path,
                source=source,
                accept=accept,
                duplicate_window=duplicate_window,
                ack=ack,
                routes=routes,
                marks=tuple(
                    (located.path, located.node.start_mark.line + 1, located.node.start_mark.column + 1)
                    for located in self.result.route_maps
                ),
            )

    def routes(self, node: yaml.Node, path: str) -> tuple[RouteConfig, ...]:
        return self.seq(node, path, self.route, example="[{to: [his]}]", unique=False)

    def source(self, node: yaml.Node, path: str) -> SourceConfig | None:
        start = len(self.problems)
        m = self.mapping(node, path, _SOURCE_KEYS)
        if m is None:
            return None
        listen = m.get("listen", _listen)
        if listen is not None:
            self.result.listen_port = _Located(
                value=server_port_of(listen),
                node=m.entries["listen"][1],
                file=self.file,
                path=_join(path, "listen"),
            )
        values = dict(
            allow=m.get("allow", _nullable(self.allow), None),
            max_message_bytes=m.get("max_message_bytes", _size, DEFAULT_MAX_MESSAGE_BYTES),
            idle_timeout=m.get("idle_timeout", _duration(allow_never=True), DEFAULT_IDLE_TIMEOUT),
            frame_timeout=m.get("frame_timeout", _duration(), DEFAULT_FRAME_TIMEOUT),
            charset=m.get("charset", _charset, DEFAULT_CHARSET),
            lenient_framing=m.get("lenient_framing", _bool, False),
            max_connections=m.get("max_connections", _int(1), DEFAULT_MAX_CONNECTIONS),
            keepalive=m.get("keepalive", _keepalive, DEFAULT_KEEPALIVE),
        )
        if not self.clean_since(start):
            return None
        return SourceConfig(listen=listen, **values)

    def allow(self, node: yaml.Node, path: str) -> tuple[_IPNetwork, ...]:
        empty = "an empty list would refuse every peer; leave the key out to allow any peer"
        return self.seq(node, path, _network, example="[10.20.0.0/16, 127.0.0.1/32]", empty=empty)

    def filter(self, read: _Reader[str], example: str, meaning: str) -> _Reader[frozenset[str] | None]:
        """A reader for an optional filter list such as accept.types (null: no filter)."""
        return _nullable(lambda n, p: self.filter_set(n, p, read, example=example, meaning=meaning))

    def accept(self, node: yaml.Node, path: str) -> AcceptConfig:
        m = self.mapping(node, path, ("types", "versions", "processing_ids"))
        if m is None:
            return AcceptConfig()
        rejects = "reject every message"
        return AcceptConfig(
            types=m.get("types", self.filter(_message_type, "[SRM^S01, ORU]", rejects), None),
            versions=m.get("versions", self.filter(_version, '["2.4", "2.5.1"]', rejects), None),
            processing_ids=m.get(
                "processing_ids", self.filter(_choice(*PROCESSING_IDS), "[P]", rejects), None
            ),
        )

    def duplicates(self, node: yaml.Node, path: str) -> float:
        m = self.mapping(node, path, ("window",))
        if m is None:
            return DEFAULT_DUPLICATE_WINDOW
        return m.get("window", _duration(allow_zero=True), DEFAULT_DUPLICATE_WINDOW)

    def ack(self, node: yaml.Node, path: str) -> AckConfig:
        m = self.mapping(node, path, ("mode", "store_failure", "rejected", "accept_ack"))
        if m is None:
            return AckConfig()

        def mode(n: yaml.Node, p: str) -> str:
            return _choice(*ACK_MODES)(n, p)

        return AckConfig(
            mode=m.get("mode", mode, "on-store"),
            store_failure=m.get("store_failure", _choice(*STORE_FAILURE_CODES), "AE"),
            rejected=m.get("rejected", _choice(*STORE_FAILURE_CODES), "AR"),
            accept_ack=m.get("accept_ack", _choice(*ACCEPT_ACK_POLICIES), "as-asked"),
        )

    def destinations(self, node: yaml.Node, path: str) -> None:
        if _is_null(node):
            return
        m = self.mapping(node, path, None)
        if m is None:
            return
        for name, key_node, value_node in m.items():
            dest_path = _join(path, name)
            start = len(self.problems)
            try:
                _name(key_node, dest_path)
            except _Invalid as invalid:
                self.report(key_node, dest_path, str(invalid))
            config = self.destination(name, value_node, dest_path)
            located = _Located(
                value=config if self.clean_since(start) else None,
                node=key_node,
                file=self.file,
                path=dest_path,
                name=name,
            )
            self.result.destinations.append(located)

    def destination(self, name: str, node: yaml.Node, path: str) -> DestinationConfig | None:
        start = len(self.problems)
        m = self.mapping(node, path, _DESTINATION_KEYS)
        if m is None:
            return None
        endpoint = m.get("endpoint", _client_endpoint)
        values = dict(
            ack_timeout=m.get("ack_timeout", _duration(), DEFAULT_ACK_TIMEOUT),
            connect_timeout=m.get("connect_timeout", _duration(), DEFAULT_CONNECT_TIMEOUT),
            retry=m.get("retry", self.retry, RetryConfig()),
            give_up_after=m.get("give_up_after", _duration(allow_never=True), DEFAULT_GIVE_UP_AFTER),
            on_nak=m.get("on_nak", self.on_nak, OnNakConfig()),
            max_queue=m.get("max_queue", _int(1), DEFAULT_MAX_QUEUE),
            rewrite=m.get("rewrite", self.rewrite, ()),
            charset=m.get("charset", _nullable(_charset), None),
            order=m.get("order", _choice(*ORDERS), "fifo"),
            parallel=m.get("parallel", _int(1), 1),
            connection=m.get("connection", _choice(*CONNECTIONS), "keep"),
            keepalive=m.get("keepalive", _keepalive, DEFAULT_KEEPALIVE),
        )
        if values["parallel"] > 1 and values["order"] != "none":
            self.report(
                m.entries["parallel"][1],
                _join(path, "parallel"),
                "more than 1 needs order: none (fifo sends one at a time)",
            )
        if not self.clean_since(start):
            return None
        return DestinationConfig(name=name, endpoint=endpoint, **values)

    def retry(self, node: yaml.Node, path: str) -> RetryConfig:
        m = self.mapping(node, path, ("initial", "factor", "max", "jitter"))
        if m is None:
            return RetryConfig()
        default = RetryConfig()
        initial = m.get("initial", _duration(), default.initial)
        maximum = m.get("max", _duration(), default.max)
        if initial is not None and maximum is not None and maximum < initial:
            where = m.entries["max"][1] if "max" in m.entries else node
            self.report(where, _join(path, "max"), "must be at least retry.initial")
            maximum = initial
        return RetryConfig(
            initial=initial,
            factor=m.get("factor", _number(1), default.factor),
            max=maximum,
            jitter=m.get("jitter", _number(0, 1), default.jitter),
        )

    def on_nak(self, node: yaml.Node, path: str) -> OnNakConfig:
        m = self.mapping(node, path, ("AE", "CE", "AR", "CR"))
        if m is None:
            return OnNakConfig()
        default = OnNakConfig()
        action = _choice(*NAK_ACTIONS)
        codes = ("AE", "CE", "AR", "CR")
        return OnNakConfig(**{code: m.get(code, action, getattr(default, code)) for code in codes})

    def rewrite(self, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
        m = self.mapping(node, path, None)
        if m is None:
            return ()
        out: list[tuple[int, str, str]] = []
        for key, key_node, value_node in m.items():
            key_path = _join(path, key)
            match = _REWRITE_FIELD_RE.fullmatch(key)
            number = int(match[1]) if match else 0
            if not 3 <= number <= 21:
                self.report(key_node, key_path, "expected a header field MSH-3 .. MSH-21")
                continue
            if number in _REWRITE_FORBIDDEN:
                self.report(key_node, key_path, f"cannot be rewritten: {_REWRITE_FORBIDDEN[number]}")
                continue
            if _is_null(value_node):
                self.report(value_node, key_path, 'needs a value (write "" to empty the field)')
                continue
            try:
                value = _text(value_node)
            except _Invalid as invalid:
                self.report(value_node, key_path, str(invalid))
                continue
            if any(c in value for c in "|\r\n"):
                self.report(value_node, key_path, "must not contain '|' or line breaks")
                continue
            out.append((number, key, value))
        return tuple((key, value) for _, key, value in sorted(out))

    def route(self, node: yaml.Node, path: str) -> RouteConfig:
        m = self.mapping(node, path, ("to", "when", "map"))
        if m is None:  # reported; the channel is dropped because the walker counted it
            return RouteConfig(to=())

        def target(n: yaml.Node, p: str) -> str:
            value = _name(n, p)
            self.result.route_targets.append(_Located(value=value, node=n, file=self.file, path=p))
            return value

        def to(n: yaml.Node, p: str) -> tuple[str, ...]:
            return self.seq(n, p, target, example="[hix-agenda]", empty="needs at least one destination")

        def when(n: yaml.Node, p: str) -> tuple:
            w = self.mapping(n, p, ("types", "fields", "unless"))
            if w is None:
                return None, (), ()
            return (w.get("types", self.filter(_message_type, "[SRM^S01, ORU]", "never match"), None),
                    w.get("fields", self.field_conditions, ()), w.get("unless", self.field_conditions, ()))

        mapping_name = m.get("map", _nullable(_name), None)
        targets = m.get("to", to, None if mapping_name else _REQUIRED)
        types, fields, unless = m.get("when", _nullable(when), None) or (None, (), ())
        if mapping_name:
            self.result.route_maps.append(_Located(value=mapping_name, node=m.entries["map"][1], file=self.file,
                                                   path=_join(path, "map")))
        # A route that failed to read is still returned: the channel is dropped anyway
        # because the walker counted its problems.
        return RouteConfig(to=targets or (), types=types, map=mapping_name, fields=fields, unless=unless)

    def field_conditions(self, node: yaml.Node, path: str) -> tuple[FieldCondition, ...]:
        """``{PATH: value or [values]}``: each path checked by the mapping language's grammar,
        a bad one reported at its own column."""
        m = self.mapping(node, path, None)
        if m is None:
            return ()
        if not m.entries:
            raise _Invalid("an empty map says nothing; leave the key out instead")
        out = []
        for key, key_node, value_node in m.items():
            key_path = _join(path, key)
            patterns = self.read(value_node, key_path,
                                 lambda n, p: self.seq(n, p, _pattern, example='[LAB*, "Laboratorium"]', empty=(
                                     "an empty list would never match; leave the key out instead"))
                                 if isinstance(n, yaml.SequenceNode) else (_pattern(n, p),))
            if not patterns:  # (each bad item is reported already)
                continue
            try:
                out.append(FieldCondition.of(key, patterns))
            except PathError as error:
                quoted = 1 if key_node.style in ("'", '"') else 0  # the column is in the path, after a quote
                self.report(key_node, key_path, f"{error.reason} (column {error.column} of the path)",
                            col_offset=error.column - 1 + quoted)
        return tuple(out)


# ---------------------------------------------------------------------------------------
# Loading


_FileOutcome = tuple[_FileResult, list[ConfigProblem]]


def compose_file(file: Path, display: str, *, empty: str) -> tuple[yaml.Node | None, list[ConfigProblem]]:
    """A YAML file as a node tree (marks kept for file:line:col), or the located problem.

    Every config file (channels, mappings, templates, agendas) is read through here, so
    unreadable files, bad encodings and YAML syntax errors are reported alike.
    """

    def fail(line: int | None, col: int | None, path: str, message: str):
        return None, [ConfigProblem(file=display, line=line, col=col, path=path, message=message)]

    try:
        data = file.read_bytes()
    except OSError as error:
        return fail(None, None, "(file)", f"cannot read: {error.strerror}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line, col = _line_col(data.decode("utf-8", errors="replace"), error.start)
        return fail(line, col, "(file)", "not valid UTF-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        context = f" ({error.context})" if error.context else ""
        hint = _YAML_HINTS.get(error.problem or "", "")
        return fail(line, col, "(yaml)", f"YAML syntax: {error.problem}{context}{hint}")
    except yaml.YAMLError as error:  # e.g. a control character the reader refuses
        reason = getattr(error, "reason", None) or str(error)
        return fail(*_line_col(text, getattr(error, "position", 0)), "(yaml)", f"YAML syntax: {reason}")
    if root is None:
        return fail(1, 1, "(top)", f"file is empty; {empty}")
    return root, []


_ENV_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
_RESOLVER = yaml.resolver.Resolver()


def substitute_environment(root: yaml.Node, environ: Mapping[str, str], display: str) -> list[ConfigProblem]:
    """Put ``${NAME}`` (and ``${NAME:-default}``, used when NAME is unset or empty) from the
    environment into every value of a channel file, ``$$`` being a ``$``: one channel file for
    every environment (test, acceptance, production), each with its own hosts and ports. A
    plain value is typed again after (``port: ${PORT}`` is a number). Keys are never touched."""
    problems: list[ConfigProblem] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # (an alias shares its anchor's node)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((value, _join(path, key.value if isinstance(key, yaml.ScalarNode) else "?"))
                         for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, _join(path, index)) for index, item in enumerate(node.value))
        elif isinstance(node, yaml.ScalarNode) and "$" in node.value:
            refused: list[tuple[int, str, str]] = []  # (offset in the value, name, why), in value order

            def value_of(match: re.Match[str]) -> str:
                name, default = match[1], match[2]
                if name is None:
                    return "$"
                if default is not None and "${" in default:  # ${A:-${B}}: not taken apart, refused
                    refused.append((match.start(), name, f"the default of ${{{name}:-...}} holds another ${{...}}; "
                                                         "give a plain default (or set the variable)"))
                    return match[0]
                value = environ.get(name)
                if value:
                    return value
                if default is not None:
                    return default
                refused.append((match.start(), name, f"environment variable {name} is not set (set it in the "
                                                     f"engine's environment, or give a default: ${{{name}:-value}})"))
                return match[0]

            text = _ENV_RE.sub(value_of, node.value)
            for offset, name, message in refused:
                line, col = _source_position(node, offset, name)
                problems.append(ConfigProblem(file=display, line=line, col=col, path=path or "(top)",
                                              message=message))
            if not refused:
                node.value = text
                if node.style is None:
                    node.tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    return problems


def _source_position(node: yaml.ScalarNode, offset: int, name: str) -> tuple[int, int]:
    """Where the ``${NAME`` at ``offset`` in a scalar's value is in the file (1-based): found
    in the file's own text when the parser kept it (a quoted or multi-line value is not the
    text it was written as), else the value's start."""
    start, end = node.start_mark, node.end_mark
    buffer = getattr(start, "buffer", None)
    token = "${" + name
    if buffer and start.pointer is not None and end.pointer is not None:
        source = buffer[start.pointer:end.pointer]
        nth = node.value.count(token, 0, offset)  # the same variable earlier in the value
        at = -1
        for _ in range(nth + 1):
            at = source.find(token, at + 1)
            if at < 0:
                break
        if at >= 0:
            return _line_col(buffer, start.pointer + at)
    return start.line + 1, start.column + 1


def _read_file(file: Path, display: str, environ: Mapping[str, str]) -> _FileOutcome:
    reader = _ChannelReader(file, display)
    root, problems = compose_file(file, display, empty="expected a channel with name and source")
    if root is None:
        return reader.result, problems
    problems = substitute_environment(root, environ, display)
    if problems:
        return reader.result, problems
    reader.channel(root)
    return reader.result, reader.problems


def _cross_check(results: list[_FileResult]) -> tuple[list[ConfigProblem], list[DestinationConfig]]:
    """Checks that span files: names, ports, global destinations, shared queues, routes."""
    problems: list[ConfigProblem] = []

    def report(located: _Located, message: str) -> None:
        mark = located.node.start_mark
        line, col, path = mark.line + 1, mark.column + 1, located.path
        problems.append(ConfigProblem(file=located.file, line=line, col=col, path=path, message=message))

    names: dict[str, _Located] = {}
    ports: dict[int, _Located] = {}
    for result in results:
        if result.name is not None:
            first = names.setdefault(result.name.value, result.name)
            if first is not result.name:
                report(result.name, f"channel {result.name.value!r} is already defined at {first.where()}")
        if result.listen_port is not None and result.listen_port.value != 0:  # 0: any free port
            first = ports.setdefault(result.listen_port.value, result.listen_port)
            if first is not result.listen_port:
                port = result.listen_port.value
                report(result.listen_port, f"port {port} is already used by the channel at {first.where()}")

    declared: set[str] = set()
    by_name: dict[str, _Located] = {}
    for result in results:
        for located in result.destinations:
            name = located.name
            declared.add(name)
            if located.value is None:
                continue
            first = by_name.setdefault(name, located)
            if first is not located and first.value != located.value:
                differ = [
                    f.name
                    for f in dataclasses.fields(DestinationConfig)
                    if getattr(first.value, f.name) != getattr(located.value, f.name)
                ]
                report(
                    located,
                    f"differs from the definition at {first.where()} in {', '.join(differ)}; "
                    "one name means one destination everywhere",
                )

    by_queue: dict[str, _Located] = {}
    for located in by_name.values():
        config: DestinationConfig = located.value
        first = by_queue.setdefault(config.queue_key, located)
        if first is located:
            continue
        other: DestinationConfig = first.value
        differ = [s for s in _CONNECTION_SETTINGS if getattr(config, s) != getattr(other, s)]
        scheme, _, _, options = _client_endpoint_parts(config.endpoint)
        other_scheme, _, _, other_options = _client_endpoint_parts(other.endpoint)
        if (scheme, options) != (other_scheme, other_options):
            differ.insert(0, "endpoint options")
        if differ:
            report(
                located,
                f"shares queue {config.queue_key} with destination {other.name!r} ({first.where()}) "
                f"but differs in {', '.join(differ)}; one connection needs one setting",
            )

    for result in results:
        for target in result.route_targets:
            if target.value not in declared:
                known = ", ".join(sorted(declared)) if declared else "none are defined"
                report(target, f"unknown destination {target.value!r} (destinations: {known})")
    return problems, sorted((loc.value for loc in by_name.values()), key=lambda d: d.name)


def load_config(channels_dir: Path, mappings_dir: Path, *, environ: Mapping[str, str] | None = None) -> EngineConfig:
    """Read every channels_dir/*.yaml (sorted by file name); raise ConfigError listing all problems.
    ``${NAME}`` in a value comes from ``environ`` (default: the process environment)."""
    channels_dir, mappings_dir = Path(channels_dir), Path(mappings_dir)
    environ = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []

    def unplaced(where: Path, path: str, message: str) -> None:
        problems.append(ConfigProblem(file=str(where), line=None, col=None, path=path, message=message))

    files: list[Path] = []
    if not channels_dir.is_dir():
        unplaced(channels_dir, "(channels)", "not a directory")
    else:
        files = sorted(p for p in channels_dir.glob("*.yaml") if p.is_file() and not p.name.startswith("."))
        for stray in sorted(channels_dir.glob("*.yml")):
            unplaced(stray, "(file)", "channel files must end in .yaml; this one would be ignored")
        if not files:
            unplaced(channels_dir, "(channels)", "no channel files (*.yaml); at least one channel is needed")
    if not mappings_dir.is_dir():
        unplaced(mappings_dir, "(mappings)", "not a directory")

    results: list[_FileResult] = []
    for file in files:
        result, file_problems = _read_file(file, str(file), environ)
        results.append(result)
        problems.extend(file_problems)
    cross_problems, destinations = _cross_check(results)
    problems.extend(cross_problems)
    if problems:
        order = {str(f): i for i, f in enumerate(files)}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.line or 0, p.col or 0))
        raise ConfigError(problems)
    return EngineConfig(
        channels=tuple(r.channel for r in results if r.channel is not None),
        destinations=tuple(destinations),
    )
