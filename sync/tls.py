"""TLS for the MQTT link, with the stdlib `ssl` module: check our own files, name every failure.

* `TlsFiles(ca, cert, key).context(now)` returns an `ssl.SSLContext` (TLS 1.2 or later,
  the broker's certificate and hostname verified) or raises `TlsConfigError` whose `alarm`
  names the cause: a file missing or unreadable, not PEM, a key that does not match its
  certificate, our own client certificate expired or not yet valid. These are checked
  before any connection, at start and before every connect attempt: the files are read
  again when they change on disk, so fixing them heals the link without a restart.
* `classify(exc, host, port)` names a handshake failure (ssl.SSLCertVerificationError's
  verify_code: unknown CA, hostname mismatch, expired certificate; or the broker's alert
  refusing our client certificate); None for a plain network error (refused, reset,
  timeout), which is a link that is down, not a configuration to fix.
* `refused(reason_code, text, host, port)` names a CONNACK that refuses our credentials.

An alarm is a `LinkAlarm(code, message, kind)`: `kind` "config" for our own files (cleared
as soon as they check out again), "peer" for what the broker said (cleared by the next
successful connect). `TlsLink` is the context sync/mqtt.py hands paho. Nothing here
imports paho.
"""

from __future__ import annotations

import calendar
import errno
import os
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from common import clock

CONFIG, PEER = "config", "peer"

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
_VERIFY = {
    2: "tls_unknown_ca", 18: "tls_unknown_ca", 19: "tls_unknown_ca", 20: "tls_unknown_ca",
    21: "tls_unknown_ca", 27: "tls_unknown_ca",
    9: "tls_server_cert_not_yet_valid", 10: "tls_server_cert_expired",
    62: "tls_hostname_mismatch", 64: "tls_hostname_mismatch",
}
_HINT = {
    "tls_unknown_ca": "the broker's certificate is not signed by the CA in mqtt.tls_ca",
    "tls_hostname_mismatch": "the broker's certificate does not name mqtt.host (check its subjectAltName)",
    "tls_server_cert_expired": "the broker's certificate (or its CA) has expired",
    "tls_server_cert_not_yet_valid": "the broker's certificate is not valid yet (check both clocks)",
}
# Alerts a broker sends when it refuses the client certificate we presented (or its absence).
_CLIENT_REFUSED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                   "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                   "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                   "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_HANDSHAKE_FAILURE"}
# CONNACK reason codes that say "your identity", not "try later" (MQTT 3.1.1 return codes
# 1, 2, 4, 5 arrive as 0x84, 0x85, 0x86, 0x87).
_CREDENTIALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}


@dataclass(frozen=True)
class LinkAlarm:
    """Why the link cannot work as configured: a stable `code`, a message naming the cause."""

    code: str
    message: str
    kind: str = PEER

    def as_dict(self, since: str) -> dict:
        return {"code": self.code, "message": self.message, "since": since}


class TlsConfigError(ssl.SSLError):
    """Our own TLS files cannot be used; `alarm` says which and why (an OSError, as paho expects)."""

    def __init__(self, alarm: LinkAlarm):
        super().__init__(alarm.message)
        self.alarm = alarm


def _config(code: str, message: str) -> TlsConfigError:
    return TlsConfigError(LinkAlarm(code, message, CONFIG))


class TlsFiles:
    """The `[mqtt] tls_ca/tls_cert/tls_key` files; `context(now)` as in the module docstring."""

    def __init__(self, ca: str = "", cert: str = "", key: str = ""):
        self.ca, self.cert, self.key = ca, cert, key
        self._signature: tuple | None = None
        self._context: ssl.SSLContext | None = None
        self._valid: tuple[float, float] = (0.0, float("inf"))
        self._error: TlsConfigError | None = None

    def context(self, now: float | None = None) -> ssl.SSLContext:
        """Return the context for the files as they are now; raise TlsConfigError naming the cause."""
        now = time.time() if now is None else now
        signature = self._stat()
        if signature != self._signature or (self._context is None and self._error is None):
            self._signature = signature
            try:
                self._context, self._valid, self._error = self._load(), self._validity(), None
            except TlsConfigError as exc:
                self._context, self._error = None, exc
        if self._error is not None:
            raise self._error
        not_before, not_after = self._valid
        if now >= not_after:
            raise _config("tls_client_cert_expired",
                          f"mqtt.tls_cert {self.cert}: our client certificate expired at"
                          f" {clock.rfc3339(not_after)}; install a renewed one")
        if now < not_before:
            raise _config("tls_client_cert_not_yet_valid",
                          f"mqtt.tls_cert {self.cert}: our client certificate is valid only from"
                          f" {clock.rfc3339(not_before)} (is this clock right?)")
        assert self._context is not None
        return self._context

    def _stat(self) -> tuple:
        def one(path: str):
            if not path:
                return None
            try:
                st = os.stat(path)
            except OSError as exc:
                return exc.errno
            return st.st_ino, st.st_size, st.st_mtime_ns
        return one(self.ca), one(self.cert), one(self.key)

    def _read(self, key: str, path: str) -> str:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise _config("tls_file_missing", f"mqtt.{key} {path}: no such file") from None
        except OSError as exc:
            raise _config("tls_file_unreadable",
                          f"mqtt.{key} {path}: cannot read it: {exc.strerror or errno.errorcode.get(exc.errno)}") from None
        text = data.decode("ascii", errors="replace")
        wanted = "PRIVATE KEY-----" if key == "tls_key" else "-----BEGIN CERTIFICATE-----"
        if wanted not in text:
            what = "a PEM private key" if key == "tls_key" else "a PEM certificate"
            raise _config("tls_not_pem", f"mqtt.{key} {path}: not {what} (no {wanted.strip('-')} block)")
        return text

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies the certificate and the hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca:
            text = self._read("tls_ca", self.ca)
            try:
                ctx.load_verify_locations(cadata=text)
            except (ssl.SSLError, ValueError) as exc:
                raise _config("tls_not_pem", f"mqtt.tls_ca {self.ca}: not a usable PEM certificate: {exc}") from None
        else:
            ctx.load_default_certs()
        if self.cert:
            self._cert_text = self._read("tls_cert", self.cert)
            if self.key:
                self._read("tls_key", self.key)
            try:
                # A key that needs a passphrase cannot be used unattended: never prompt.
                ctx.load_cert_chain(self.cert, self.key or None, password=lambda: b"")
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" in str(exc) or getattr(exc, "reason", "") == "KEY_VALUES_MISMATCH":
                    raise _config("tls_key_mismatch", f"mqtt.tls_key {self.key or self.cert} does not match"
                                  f" the certificate in mqtt.tls_cert {self.cert}") from None
                raise _config("tls_not_pem", f"mqtt.tls_cert {self.cert} / mqtt.tls_key {self.key}:"
                              f" cannot load the certificate and key: {exc.reason or exc}") from None
            except OSError as exc:   # removed between the read and the load
                raise _config("tls_file_unreadable", f"mqtt.tls_cert {self.cert}: {exc.strerror}") from None
        return ctx

    def _validity(self) -> tuple[float, float]:
        if not self.cert:
            return 0.0, float("inf")
        try:
            return certificate_validity(ssl.PEM_cert_to_DER_cert(_first_pem(self._cert_text)))
        except (ValueError, IndexError) as exc:
            raise _config("tls_not_pem", f"mqtt.tls_cert {self.cert}: cannot read the certificate's dates: {exc}") from None


class TlsLink:
    """The TLS context paho uses (duck-typed `ssl.SSLContext`): fresh files, failures reported.

    paho calls `wrap_socket(sock, server_hostname=..., do_handshake_on_connect=False)` and
    then `do_handshake()` on paho's thread. The context comes from `TlsFiles` at each
    attempt (reloaded when the files changed); the socket reports every TLS error of the
    handshake and of later reads (TLS 1.3 brokers refuse a client certificate after the
    client's handshake is done) to `failed`, then raises it to paho as before.
    """

    check_hostname = True   # paho then leaves hostname verification to OpenSSL

    def __init__(self, files: TlsFiles, host: str, port: int, failed: Callable[[BaseException], None]):
        self.files, self.host, self.port = files, host, port
        self._failed = failed
        self._socket_class = _watched_socket_class(failed)

    def check(self) -> LinkAlarm | None:
        """Check the files now; return the alarm naming what is wrong, or None."""
        try:
            self.files.context()
        except TlsConfigError as exc:
            return exc.alarm
        return None

    def wrap_socket(self, sock, server_hostname=None, do_handshake_on_connect=True, **kwargs):
        try:
            context = self.files.context()   # TlsConfigError is an OSError: paho backs off and retries
        except TlsConfigError:
            sock.close()
            raise
        context.sslsocket_class = self._socket_class
        return context.wrap_socket(sock, server_hostname=server_hostname,
                                   do_handshake_on_connect=do_handshake_on_connect, **kwargs)


def _watched_socket_class(failed: Callable[[BaseException], None]) -> type[ssl.SSLSocket]:
    class WatchedSocket(ssl.SSLSocket):
        def do_handshake(self, *args, **kwargs):
            try:
                return super().do_handshake(*args, **kwargs)
            except ssl.SSLError as exc:
                failed(exc)
                raise

        def recv(self, *args, **kwargs):
            try:
                return super().recv(*args, **kwargs)
            except ssl.SSLError as exc:
                # Only the peer's alerts (a refused client certificate after a TLS 1.3
                # handshake); "nothing to read yet" on a non-blocking socket is the normal case.
                if "ALERT" in (exc.reason or ""):
                    failed(exc)
                raise

    return WatchedSocket


def classify(exc: BaseException, host: str, port: int) -> LinkAlarm | None:
    """Name a TLS failure seen while connecting or reading; None for a plain network error."""
    where = f"{host}:{port}"
    if isinstance(exc, TlsConfigError):
        return exc.alarm
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = _VERIFY.get(exc.verify_code, "tls_verify_failed")
        hint = _HINT.get(code, "the broker's certificate could not be verified")
        return LinkAlarm(code, f"TLS to {where}: {hint} ({exc.verify_message}, X509 error {exc.verify_code})")
    if isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError, ssl.SSLEOFError)):
        return None
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in _CLIENT_REFUSED:
            return LinkAlarm("tls_client_cert_refused",
                             f"TLS to {where}: the broker refused our client certificate ({reason}):"
                             " check mqtt.tls_cert/tls_key and that the broker trusts their CA")
        if reason == "WRONG_VERSION_NUMBER":
            return LinkAlarm("tls_handshake_failed", f"TLS to {where}: the broker does not speak TLS on this port"
                             f" ({reason}); check mqtt.port")
        return LinkAlarm("tls_handshake_failed", f"TLS to {where}: handshake failed ({reason})")
    return None


def refused(reason_code: int, text: str, host: str, port: int) -> LinkAlarm | None:
    """Name a CONNACK refusal that is about our identity; None for one that may pass by itself."""
    if reason_code not in _CREDENTIALS:
        return None
    return LinkAlarm("broker_refused",
                     f"the broker at {host}:{port} refused our credentials: {text} (reason code"
                     f" 0x{reason_code:02X}); check mqtt.username/password or the client certificate's"
                     " identity against the broker's password file and ACL")


def _first_pem(text: str) -> str:
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return text[begin:end]


# ------------------------------------------------------------ DER, just enough for the dates


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """Return (tag, start of the value, end of the value) of the DER element at `at`."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4:
            raise ValueError("DER length out of range")
        length = int.from_bytes(der[at:at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("DER element runs past the certificate")
    return tag, at, at + length


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii")
    if tag == 0x17:      # UTCTime YYMMDDHHMMSSZ: 50..99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:    # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"unexpected time tag 0x{tag:02x}")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError(f"unexpected time {raw!r}")
    return float(calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S")))


def certificate_validity(der: bytes) -> tuple[float, float]:
    """Return a DER X.509 certificate's (notBefore, notAfter) as Unix times; ValueError when malformed."""
    _, cert, _ = _tlv(der, 0)                # Certificate
    _, tbs, _ = _tlv(der, cert)              # TBSCertificate
    at = tbs
    tag, _, end = _tlv(der, at)
    if tag == 0xA0:                          # [0] version, optional
        at = end
    for _ in range(3):                       # serialNumber, signature, issuer
        _, _, at = _tlv(der, at)
    tag, start, _ = _tlv(der, at)            # validity
    if tag != 0x30:
        raise ValueError("no validity sequence")
    tag1, s1, e1 = _tlv(der, start)
    tag2, s2, e2 = _tlv(der, e1)
    return _time(tag1, der[s1:e1]), _time(tag2, der[s2:e2])
