"""Configuration: one YAML file < environment < flags, validated with errors that name the key.

Every setting is declared once, as a dataclass field with its parser and help text. The YAML keys,
the `FAKTORY_GATEWAY_*` environment variables and the flags are all derived from that declaration,
so they cannot drift apart.

Unknown keys in the file are errors (a typo must not silently fall back to a default). Unknown
`FAKTORY_GATEWAY_*` environment variables are ignored on purpose: Kubernetes injects
`FAKTORY_GATEWAY_PORT`, `FAKTORY_GATEWAY_SERVICE_HOST`, ... into every pod of a namespace that has a
Service named `faktory-gateway`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from .urls import redact_url

ENV_PREFIX = "FAKTORY_GATEWAY_"
DEFAULT_FAKTORY_PORT = 7419


class ConfigError(Exception):
    """A user mistake in the configuration; printed as one line, never as a traceback."""


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes what YAML, the environment or a flag gave and returns the typed value,
# or raises ValueError with a message that says what is allowed.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}


def parse_duration(value: Any) -> float:
    """Seconds, from `250ms`, `30s`, `5m`, `1h`, `7d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 250ms")
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError("expected a duration such as 30s, 5m, 250ms")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes, from `16MiB`, `64KiB`, `1GB` or a plain number of bytes."""
    match = _SIZE.match(str(value)) if not isinstance(value, bool) else None
    if not match:
        raise ValueError("expected a size such as 16MiB, 64KiB, 1000000")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def parse_count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError("expected a whole number") from None
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parse_text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected a string")
    return str(value)


class Mode(enum.StrEnum):
    """How the batch rules act (README, "Configuration")."""

    STRICT = "strict"  # committed means sealed
    MEMBER_REOPEN = (
        "member-reopen"  # Enterprise's documented rule: a worker holding a job of the batch may reopen it
    )
    SHADOW = "shadow"  # decide as strict, forward everything, count what would have been refused


class Batches(enum.StrEnum):
    """Who keeps the batches."""

    ENTERPRISE = "enterprise"  # Faktory Enterprise does; the gateway enforces its documented rules
    GATEWAY = "gateway"  # the gateway does, in front of Faktory OSS (docs/engine.md)


class UnknownBatch(enum.StrEnum):
    """What the rules do with a batch the ledger has no record of."""

    VERIFY = "verify"  # ask the server's BATCH STATUS
    ALLOW = "allow"
    REJECT = "reject"


class OnStoreError(enum.StrEnum):
    """What batch commands get when the ledger cannot be asked."""

    REJECT = "reject"
    ALLOW = "allow"


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class one_of:
    """Parses one of an enum's values; `choices` are shown in --help."""

    def __init__(self, choices: type[enum.StrEnum]):
        self.enum = choices
        self.choices = tuple(choices)

    def __call__(self, value: Any) -> enum.StrEnum:
        text = str(value).strip()
        try:
            return self.enum(text)
        except ValueError:
            raise ValueError("allowed: " + ", ".join(self.choices)) from None


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> Address:
    """`HOST:PORT`, `:PORT` (all interfaces) or `[v6]:PORT`."""
    text = str(value).strip()
    match = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]*)):(\d+)$", text)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:7419")
    host = match.group(1) or match.group(2) or "0.0.0.0"
    return Address(host, int(match.group(3)))


@dataclass(frozen=True)
class UpstreamURL:
    """A Faktory URL. Clients' handshakes are relayed; the password is used only by the gateway's
    own connection (`batches: gateway` pushes callback jobs on it) and never shown."""

    tls: bool
    host: str
    port: int
    password: str = field(default="", repr=False)

    @property
    def has_password(self) -> bool:
        return bool(self.password)

    def __str__(self) -> str:
        auth = ":***@" if self.has_password else ""
        return f"{'tcp+tls' if self.tls else 'tcp'}://{auth}{self.host}:{self.port}"


def parse_upstream(value: Any) -> UpstreamURL:
    text = str(value).strip()
    if not text:
        raise ValueError("required: the Faktory server's URL, for example tcp://faktory:7419")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in ("tcp", "tcp+tls"):
        raise ValueError("scheme must be tcp:// or tcp+tls://")
    if not parts.hostname:
        raise ValueError("no host, expected tcp://HOST:PORT")
    password = unquote(parts.password) if parts.password else ""
    return UpstreamURL(parts.scheme == "tcp+tls", parts.hostname, port or DEFAULT_FAKTORY_PORT, password)


def parse_redis_url(value: Any) -> str:
    text = str(value or "").strip()
    if text and urlsplit(text).scheme not in ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster"):
        raise ValueError("scheme must be redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://")
    return text


# ---------------------------------------------------------------------------------------------
# The settings. `flag` names the command-line flag where one exists; `secret` values are redacted.


def setting(
    default: Any, parse: Callable[[Any], Any], help: str, flag: str | None = None, secret: bool = False
):
    return field(default=default, metadata={"parse": parse, "help": help, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class UpstreamTLS:
    ca_file: str = setting(
        "", parse_text, "CA bundle to verify the upstream's certificate (default: system CAs)"
    )
    verify: bool = setting(True, parse_bool, "verify the upstream's certificate and host name")


@dataclass(frozen=True)
class ClientTLS:
    cert_file: str = setting("", parse_text, "certificate for clients (enables TLS on the data port)")
    key_file: str = setting("", parse_text, "private key for cert_file")


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = setting(16 * 2**20, parse_size, "longest command line a client may send")
    max_connections: int = setting(10000, parse_count, "client connections at once; more are refused")
    max_pipeline: int = setting(1000, parse_count, "commands a client may have in flight at once")
    handshake_timeout: float = setting(10.0, parse_duration, "time a new client has to send HELLO")
    idle_timeout: float = setting(0.0, parse_duration, "close a client silent this long (0 = never)")
    upstream_connect_timeout: float = setting(5.0, parse_duration, "time to dial the Faktory server")


@dataclass(frozen=True)
class HTTP:
    listen: Address = setting(
        Address("0.0.0.0", 9419), parse_address, "metrics and health address", "--http-listen"
    )
    quitquitquit: bool = setting(False, parse_bool, "serve POST /quitquitquit to loopback clients")


@dataclass(frozen=True)
class Shutdown:
    min_delay: float = setting(0.0, parse_duration, "keep accepting this long after SIGTERM")
    max_delay: float = setting(30.0, parse_duration, "close whatever is left after this long")
    exit_zero_on_sigterm: bool = setting(False, parse_bool, "exit 0 after SIGTERM even if the drain was cut")


@dataclass(frozen=True)
class Log:
    format: str = setting(LogFormat.JSON, one_of(LogFormat), "log line format", "--log-format")
    level: str = setting(LogLevel.INFO, one_of(LogLevel), "lowest level logged", "--log-level")


@dataclass(frozen=True)
class Config:
    listen: Address = setting(
        Address("127.0.0.1", 7419), parse_address, "address clients connect to", "--listen"
    )
    upstream: UpstreamURL | None = setting(
        None, parse_upstream, "Faktory server URL", "--upstream", secret=True
    )
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    tls: ClientTLS = field(default_factory=ClientTLS)
    redis: str = setting(
        "", parse_redis_url, "Redis URL for the shared ledger (empty: in-process)", "--redis", True
    )
    redis_key_prefix: str = setting("fgw:", parse_text, "prefix of every Redis key the gateway writes")
    batches: Batches = setting(
        Batches.ENTERPRISE,
        one_of(Batches),
        "who keeps batches: the Enterprise server or the gateway",
        "--batches",
    )
    mode: Mode = setting(Mode.STRICT, one_of(Mode), "enforcement mode", "--mode")
    unknown_batch: UnknownBatch = setting(UnknownBatch.VERIFY, one_of(UnknownBatch), "batches with no record")
    on_store_error: OnStoreError = setting(
        OnStoreError.REJECT, one_of(OnStoreError), "batch commands when the store fails"
    )
    commit_fence_timeout: float = setting(5.0, parse_duration, "longest wait for in-flight pushes at commit")
    committed_retention: float = setting(
        45 * 86400.0, parse_duration, "how long a committed batch is remembered after it was last seen"
    )
    batch_retention: float = setting(
        7 * 86400.0, parse_duration, "how long a batch whose callback fired is remembered"
    )
    batch_stall_after: float = setting(
        3600.0, parse_duration, "batches: gateway: a batch whose jobs made no progress this long is stalled"
    )
    limits: Limits = field(default_factory=Limits)
    http: HTTP = field(default_factory=HTTP)
    shutdown: Shutdown = field(default_factory=Shutdown)
    log: Log = field(default_factory=Log)

    @property
    def faktory(self) -> UpstreamURL:
        """The Faktory server to proxy (`upstream`), which `load` requires."""
        if self.upstream is None:
            raise ConfigError("upstream: required (the Faktory server's URL)")
        return self.upstream

    def describe(self) -> dict[str, str]:
        """Every setting as text, secrets redacted: for the start-up log line."""
        return {key: _show(spec, value) for key, spec, value in _walk(self)}


def _show(spec: dataclasses.Field, value: Any) -> str:
    if isinstance(value, str) and spec.metadata["secret"]:
        return redact_url(value)
    return str(value)


def _walk(obj: Any, prefix: str = ""):
    """(dotted key, field, value) for every leaf setting of a Config or one of its sections."""
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        if dataclasses.is_dataclass(value) and "parse" not in spec.metadata:
            yield from _walk(value, f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", spec, value


SETTINGS: dict[str, dataclasses.Field] = {key: spec for key, spec, _ in _walk(Config())}
POLICY_KEYS = ("mode", "unknown_batch", "on_store_error", "commit_fence_timeout", "limits.")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


# ---------------------------------------------------------------------------------------------
# Loading.


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config file'}: expected a mapping of keys")
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config file {path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    flat = _flatten(tree or {})
    for key in flat:
        if key not in SETTINGS:
            near = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"config file {path}: unknown key {key}{hint}")
    return flat


def build(sources: list[tuple[str, dict[str, Any]]]) -> Config:
    """Apply each (source name, {dotted key: raw value}) in order, later ones winning, and validate."""
    chosen: dict[str, tuple[str, Any]] = {}
    for source, values in sources:
        for key, value in values.items():
            chosen[key] = (source, value)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, (source, raw) in chosen.items():
        spec = SETTINGS[key]
        try:
            value = spec.metadata["parse"](raw)
        except ValueError as exc:
            shown = redact_url(str(raw)) if spec.metadata["secret"] else raw
            raise ConfigError(f"{key}: {shown!r} is not valid ({source}): {exc}") from None
        section, _, name = key.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[name] = value
    for section, values in sections.items():
        top[section] = type(getattr(Config(), section))(**values)
    config = Config(**top)
    if config.upstream is None:
        raise ConfigError(
            f"upstream: required: the Faktory server's URL, set --upstream, {env_name('upstream')} "
            "or `upstream:` in the config file (for example tcp://faktory:7419)"
        )
    if bool(config.tls.cert_file) != bool(config.tls.key_file):
        raise ConfigError("tls: cert_file and key_file must be given together")
    if config.batches == Batches.GATEWAY and config.mode == Mode.SHADOW:
        raise ConfigError(
            "mode: shadow needs batches: enterprise (with batches: gateway the gateway is the batch "
            "server: there is no server's decision to shadow)"
        )
    if config.batches == Batches.GATEWAY and config.on_store_error == OnStoreError.ALLOW:
        raise ConfigError(
            "on_store_error: allow needs batches: enterprise (with batches: gateway a job let through "
            "unchecked would not be counted in its batch, whose callbacks could then fire too early)"
        )
    if config.shutdown.min_delay > config.shutdown.max_delay:
        raise ConfigError("shutdown.min_delay: must not be longer than shutdown.max_delay")
    return config


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faktory-gateway",
        description="A Faktory proxy that enforces Enterprise batch rules. Every setting can also be "
        f"given in the config file or as {ENV_PREFIX}<KEY>; flags win over the environment, which wins "
        "over the file.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file (env {ENV_PREFIX}CONFIG)")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    for key, spec in SETTINGS.items():
        flag = spec.metadata["flag"]
        if flag:
            choices = getattr(spec.metadata["parse"], "choices", None)
            parser.add_argument(
                flag,
                dest=key,
                metavar="|".join(choices) if choices else key.rpartition(".")[2].upper(),
                help=f"{spec.metadata['help']} (env {env_name(key)})",
            )
    return parser


@dataclass(frozen=True)
class Invocation:
    """What the command line said, kept so that SIGHUP can read the same sources again."""

    config_path: str | None
    flags: dict[str, Any]
    check_only: bool


def parse_invocation(argv: list[str] | None, environ: dict[str, str]) -> Invocation:
    args = argument_parser().parse_args(argv)
    flags = {key: value for key, value in vars(args).items() if key in SETTINGS and value is not None}
    return Invocation(args.config or environ.get(ENV_PREFIX + "CONFIG") or None, flags, args.check_config)


def load(invocation: Invocation, environ: dict[str, str]) -> Config:
    sources: list[tuple[str, dict[str, Any]]] = []
    if invocation.config_path:
        sources.append((f"from {invocation.config_path}", read_file(invocation.config_path)))
    for key in SETTINGS:
        if env_name(key) in environ:
            sources.append((f"from {env_name(key)}", {key: environ[env_name(key)]}))
    sources.extend(
        (f"from {SETTINGS[key].metadata['flag']}", {key: value}) for key, value in invocation.flags.items()
    )
    return build(sources)


def reload_policy(current: Config, invocation: Invocation, environ: dict[str, str]) -> Config:
    """The configuration re-read for SIGHUP: only the policy keys change; the rest stays as running."""
    fresh = load(invocation, environ)
    return _replace(current, {key: value for key, _, value in _walk(fresh) if key.startswith(POLICY_KEYS)})


def _replace(config: Config, changes: dict[str, Any]) -> Config:
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[name] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top)
