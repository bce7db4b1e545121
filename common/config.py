"""Configuration loading shared by the agent, its sync process and the hub.

`load_config(path, cls, "EDGE_AGENT")` reads a TOML file, applies every
`PREFIX__SECTION__KEY=value` variable (the value parsed as a TOML value, falling back to a
plain string), and validates the result strictly with msgspec. Unknown keys and wrong types
are a ConfigError naming the key and the file. This module is the only reader of the
environment for configuration.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar

import msgspec

T = TypeVar("T")
END = r"(?![\s\S])"   # end of string (a `$` would also match before a final newline)


class ConfigError(Exception):
    """A configuration file or override that cannot be used; the message names the key."""


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class MqttSection(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    topic_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*" + END)] = "retail"
    protocol: Literal[4, 5] = 5
    username: str = ""
    password: str = ""
    password_file: str = ""           # read the password from a file (systemd LoadCredential)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Plaintext MQTT carries the password and every event in the clear: refused to a broker
    # that is not on this host unless said so here (a trusted private link, a TLS tunnel).
    allow_plaintext: bool = False
    client_id: str = ""               # empty: edge-agent-{store_id} / edge-hub-{hub_id}
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # MQTT 5 session expiry. 0: the default, 7 days (a hub with hub.workers_shared: 30 s, so a
    # dead worker's session, still a member of the shared subscription, goes soon).
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here as a validation error at `mqtt`.
        if not self.tls and not self.allow_plaintext and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not loopback and no tls_* key is set: refusing plaintext MQTT"
                " (the password and every event would cross the network in the clear). Set tls_ca"
                " (and tls_cert/tls_key for certificate identity), or allow_plaintext = true for a"
                " link that is already private")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key is set without tls_cert: a client key needs its certificate")

    @property
    def tls(self) -> bool:
        """True when any tls_* key is set (the contract: any tls_* set means TLS on)."""
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def secret(self) -> str:
        """Return the password, from `password_file` when set."""
        return read_secret(self.password_file) if self.password_file else self.password


class LogSection(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["journal", "json", "text"] = "journal"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc


_AT = re.compile(r" - at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _key_of(message: str) -> tuple[str, str]:
    at = _AT.search(message)
    where = at.group(1) if at else ""
    text = _AT.sub("", message)
    for pattern, label in ((_UNKNOWN, "unknown key"), (_MISSING, "missing key")):
        found = pattern.search(text)
        if found:
            key = f"{where}.{found.group(1)}" if where else found.group(1)
            return key, label
    return where, text


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError, an integer past Python's 4,300 digits, nesting
        return raw


def env_overrides(prefix: str, environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Collect `PREFIX__SECTION__KEY` variables as {section: {key: value}}."""
    found: dict[str, dict[str, Any]] = {}
    lead = prefix + "__"
    for name, raw in environ.items():
        if not name.startswith(lead):
            continue
        parts = name[len(lead):].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"environment {name}: expected {prefix}__SECTION__KEY")
        found.setdefault(parts[0], {})[parts[1]] = _parse_env_value(raw)
    return found


def load_config(path: str | os.PathLike | None, cls: type[T], env_prefix: str,
                environ: Mapping[str, str] | None = None) -> T:
    """Load `cls` from a TOML file (None: defaults only) plus environment overrides.

    Raises ConfigError naming the file and the key for anything that does not fit (a file
    that is not UTF-8, nests too deep for the TOML parser or holds an integer of more
    than 4,300 digits included).
    """
    source = str(path) if path else "(no file)"
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config {source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {source}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {source}: not valid TOML: not UTF-8 at byte {exc.start}") from None
        except RecursionError:  # tomllib recurses per level of nested arrays and inline tables
            raise ConfigError(f"config {source}: not valid TOML: nested too deep") from None
        except ValueError as exc:  # tomllib's int(): an integer past Python's 4,300-digit limit
            raise ConfigError(f"config {source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config {source}: cannot read: {exc.strerror}") from None
    for section, keys in env_overrides(env_prefix, os.environ if environ is None else environ).items():
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config {source}: {section} is not a table, cannot override {section}.*")
        target.update(keys)
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        key, problem = _key_of(str(exc))
        if problem in ("unknown key", "missing key"):
            raise ConfigError(f"config {source}: {problem} {key}") from None
        raise ConfigError(f"config {source}: {key}: {problem}") from None
