"""The exporter-toolkit web config (node_exporter's `--web.config.file`): model, loading,
TLS context, client SAN check, basic auth, and re-reading on change.

Operators secure ksmctl the way they already secure node_exporter, so a key means what
it means there, or it is refused at load: nothing accepted is silently ignored. Relative
paths are relative to the web config file, as in the toolkit.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ksmctl.extras import require
from ksmctl.fsutil import check_path, open_input, read_input
from ksmctl.errors import ConfigError
from ksmctl.yamlload import NoBoolNumbers, YamlProblem, load_yaml, validate

log = logging.getLogger("ksmctl.exporter")


MAX_WEB_CONFIG_BYTES = 1024 * 1024   # a web config is a few lines; certificates are separate files

class ClientAuthType(str, enum.Enum):
    NO_CLIENT_CERT = "NoClientCert"
    REQUEST_CLIENT_CERT = "RequestClientCert"
    REQUIRE_ANY_CLIENT_CERT = "RequireAnyClientCert"
    VERIFY_CLIENT_CERT_IF_GIVEN = "VerifyClientCertIfGiven"
    REQUIRE_AND_VERIFY_CLIENT_CERT = "RequireAndVerifyClientCert"


class TlsVersion(str, enum.Enum):
    TLS10 = "TLS10"
    TLS11 = "TLS11"
    TLS12 = "TLS12"
    TLS13 = "TLS13"

    @property
    def ssl(self) -> ssl.TLSVersion:
        return {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}[self.value]


# Modes where a client must present a certificate: the only ones in which the toolkit
# accepts client_allowed_sans (elsewhere there may be nothing to match).
CERT_REQUIRED_MODES = (ClientAuthType.REQUIRE_ANY_CLIENT_CERT, ClientAuthType.REQUIRE_AND_VERIFY_CLIENT_CERT)
# The exporter-toolkit's list (web/handler.go extraHTTPHeaders): the only headers an operator
# may add, with the allowed values where the toolkit enumerates them (empty: any value).
ALLOWED_HEADERS: Dict[str, Tuple[str, ...]] = {
    "Strict-Transport-Security": (), "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"), "X-XSS-Protection": (), "Content-Security-Policy": (),
}
# bcrypt doubles its time per cost step (here cost 10 ~0.08 s, 14 ~1.4 s). A cost-31 hash
# would take days per uncached check: refused at load.
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 14
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A valid bcrypt hash of a random string: unknown users are checked against it so that a
# wrong user name takes as long as a wrong password (no user enumeration by timing).
_DUMMY_HASH = b"$2b$10$3Ie/DdDZ0JbUPJ1Kx4h27uSvbYzGmpcGGAiEAP5sINdLhHuzbBhSC"


class _Model(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Model):
    cert_file: str
    key_file: str
    client_auth_type: ClientAuthType = ClientAuthType.NO_CLIENT_CERT
    client_ca_file: Optional[str] = None
    client_allowed_sans: Optional[List[str]] = None
    min_version: TlsVersion = TlsVersion.TLS12
    max_version: TlsVersion = TlsVersion.TLS13
    prefer_server_cipher_suites: bool = True

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        return check_path(v, required=True)


class HttpServerConfig(_Model):
    http2: Optional[bool] = None
    headers: Dict[str, str] = Field(default_factory=dict)

    @field_validator("http2")
    @classmethod
    def _http2(cls, v: Optional[bool]) -> Optional[bool]:
        if v:
            raise ValueError("this server speaks HTTP/1.1 only; set http2: false or remove the key")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: Dict[str, str]) -> Dict[str, str]:
        for name, value in v.items():
            allowed = ALLOWED_HEADERS.get(name)
            if allowed is None:
                raise ValueError("HTTP header %r can not be configured; allowed: %s"
                                 % (name, ", ".join(ALLOWED_HEADERS)))
            if allowed and value not in allowed:
                raise ValueError("header %s: %r is not allowed; expected one of: %s"
                                 % (name, value, ", ".join(allowed)))
            if _HEADER_VALUE_FORBIDDEN.search(value):
                raise ValueError("header %s: the value must not contain control characters (CR, LF, ...)" % name)
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError("header %s: the value must be ISO-8859-1 (HTTP header) text" % name) from None
        return v


class WebConfig(_Model):
    tls_server_config: Optional[TlsServerConfig] = None
    http_server_config: HttpServerConfig = HttpServerConfig()
    basic_auth_users: Dict[str, str] = Field(default_factory=dict)

    @field_validator("basic_auth_users")
    @classmethod
    def _hashes(cls, v: Dict[str, str]) -> Dict[str, str]:
        for user, h in v.items():
            m = _BCRYPT.match(h) if isinstance(h, str) else None
            if m is None:
                raise ValueError("user %r: expected a bcrypt hash ($2y$..., 60 characters; "
                                 "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)" % user)
            cost = int(m.group(1))
            if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
                raise ValueError("user %r: bcrypt cost %d is outside %d..%d (each step doubles the time "
                                 "of a check; 10 is usual)" % (user, cost, BCRYPT_MIN_COST, BCRYPT_MAX_COST))
        return v


def load_web_config(path: str) -> "ActiveWebConfig":
    """Parse and check a web config, TLS files included; every problem names the file and key."""
    p = Path(path)
    text = read_input(path, "web config", MAX_WEB_CONFIG_BYTES, ConfigError).text
    try:
        data, lines = load_yaml(text, path)
        wc = validate(WebConfig, {} if data is None else data, path, lines)
    except YamlProblem as e:
        raise ConfigError(str(e)) from None
    if wc.basic_auth_users:
        require("auth", "basic_auth_users in %s" % path)
    tls = wc.tls_server_config
    if tls is None:
        return ActiveWebConfig(wc, None)
    base = p.resolve().parent
    fixed = {k: str(base / getattr(tls, k)) for k in ("cert_file", "key_file", "client_ca_file") if getattr(tls, k)}
    tls = tls.model_copy(update=fixed)
    wc = wc.model_copy(update={"tls_server_config": tls})
    _check_tls(tls, path)
    return ActiveWebConfig(wc, ssl_context(tls, path))


def _check_tls(tls: TlsServerConfig, path: str) -> None:
    """The toolkit's cross-key rules, plus ours: Python verifies every certificate it asks for."""
    mode = tls.client_auth_type
    where = "%s: tls_server_config" % path
    if mode != ClientAuthType.NO_CLIENT_CERT and not tls.client_ca_file:
        raise ConfigError("%s.client_auth_type: %s needs client_ca_file (ksmctl verifies every client "
                          "certificate it asks for)" % (where, mode.value))
    if tls.client_ca_file and mode == ClientAuthType.NO_CLIENT_CERT:
        raise ConfigError("%s.client_ca_file is set but client_auth_type is NoClientCert: set "
                          "client_auth_type (e.g. RequireAndVerifyClientCert) or remove client_ca_file" % where)
    if tls.client_allowed_sans is not None and mode not in CERT_REQUIRED_MODES:
        raise ConfigError("%s.client_allowed_sans requires client_auth_type RequireAnyClientCert or "
                          "RequireAndVerifyClientCert (it is %s)" % (where, mode.value))
    if tls.min_version.ssl > tls.max_version.ssl:
        raise ConfigError("%s: min_version %s is above max_version %s"
                          % (where, tls.min_version.value, tls.max_version.value))


def ssl_context(tls: TlsServerConfig, path: str) -> ssl.SSLContext:
    # OpenSSL opens these itself, blocking: a FIFO would hang the start (or, on a change,
    # every connection), a device would be read without end. Regular files only.
    for key in ("cert_file", "key_file", "client_ca_file"):
        name = getattr(tls, key)
        if name and os.path.lexists(name):  # a missing file: load_cert_chain's message below
            try:
                open_input(name, "TLS", ConfigError).close()
            except ConfigError as e:
                raise ConfigError("%s: tls_server_config.%s: %s" % (path, key, e.message)) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version.ssl
    ctx.maximum_version = tls.max_version.ssl
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("%s: tls_server_config: cannot load cert_file %s / key_file %s: %s"
                          % (path, tls.cert_file, tls.key_file, getattr(e, "strerror", None) or e)) from None
    if tls.client_ca_file:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("%s: tls_server_config.client_ca_file %s: %s"
                              % (path, tls.client_ca_file, getattr(e, "strerror", None) or e)) from None
    # Go's RequestClientCert/RequireAnyClientCert accept unverified certificates; Python
    # cannot ask for a certificate without verifying it, hence client_ca_file for them.
    mode = tls.client_auth_type
    if mode == ClientAuthType.NO_CLIENT_CERT:
        ctx.verify_mode = ssl.CERT_NONE
    elif mode in CERT_REQUIRED_MODES:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def peer_sans(cert: Optional[dict]) -> List[str]:
    """A verified peer certificate's SANs as the toolkit compares them: DNS names, e-mail
    addresses, IP addresses (in Go's text form) and URIs."""
    out: List[str] = []
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            out.append(value)
        elif kind == "IP Address":
            try:
                out.append(str(ipaddress.ip_address(value.strip())))
            except ValueError:
                out.append(value)
    return out


@dataclass(frozen=True)
class ActiveWebConfig:
    """One loaded web config with what it needs at run time (the TLS context)."""

    config: WebConfig
    tls: Optional[ssl.SSLContext]

    @property
    def users(self) -> Dict[str, str]:
        return self.config.basic_auth_users

    @property
    def headers(self) -> Dict[str, str]:
        return self.config.http_server_config.headers

    def sans_refusal(self, cert: Optional[dict]) -> Optional[str]:
        """Why a TLS client is refused by client_allowed_sans, or None when it may proceed."""
        tls = self.config.tls_server_config
        if tls is None or tls.client_allowed_sans is None:
            return None
        sans = peer_sans(cert)
        if any(s in tls.client_allowed_sans for s in sans):
            return None
        return "client certificate SANs %s are not in client_allowed_sans" % (sans or "(none)")


RETRY_SECONDS = 5.0  # a rejected web config is tried again this often, reported once
Signature = Tuple[Tuple[str, Optional[Tuple[int, int, int, int, int]]], ...]


class WebConfigSource:
    """The web config, re-read when it or a file it names changes (checked by stat on every
    connection and request, as the toolkit re-reads per request), so certificates and users
    rotate without a restart. A broken new version is logged and counted once, and the last
    good one stays. Switching between HTTP and HTTPS needs a restart (the listener's kind)."""

    def __init__(self, path: Optional[str], on_error: Callable[[str], None] = lambda msg: None) -> None:
        self.path = path
        self.on_error = on_error
        self._lock = threading.Lock()
        self._current = load_web_config(path) if path else ActiveWebConfig(WebConfig(), None)
        self._seen = self._signature(self._current)
        self._bad: Optional[Tuple[Signature, str]] = None
        self._retry_at = 0.0

    def _signature(self, active: ActiveWebConfig) -> Signature:
        if self.path is None:
            return ()
        tls = active.config.tls_server_config
        files = [self.path] + ([f for f in (tls.cert_file, tls.key_file, tls.client_ca_file) if f] if tls else [])
        return tuple((f, _stat(f)) for f in files)

    def current(self) -> ActiveWebConfig:
        if self.path is None:
            return self._current
        with self._lock:
            sig = self._signature(self._current)
            if sig == self._seen and (self._bad is None or time.monotonic() < self._retry_at):
                return self._current
            self._seen = sig
            try:
                new = load_web_config(self.path)
                if (new.tls is None) != (self._current.tls is None):
                    raise ConfigError("%s: switching between HTTP and HTTPS needs a restart" % self.path)
            except ConfigError as e:
                # A file the broken version names may appear later: retry, report once.
                self._retry_at = time.monotonic() + RETRY_SECONDS
                if self._bad != (sig, e.message):
                    self._bad = (sig, e.message)
                    log.error("web config rejected, keeping the last good one: %s", e.message)
                    self.on_error(e.message)
                return self._current
            self._current, self._bad = new, None
            self._seen = self._signature(new)
            log.info("web config %s reloaded", self.path)
            return new


def _stat(path: str) -> Optional[Tuple[int, int, int, int, int]]:
    """No file descriptor needed: this runs for every connection, also when fds are short."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BasicAuth:
    """bcrypt checks, one at a time (failed logins cannot take more than one core from the
    controller), with a cache of successes keyed like the toolkit's: user, hash and a digest
    of the password, so a rotated hash is checked afresh."""

    def __init__(self) -> None:
        self._ok: Dict[Tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()

    def check(self, header: Optional[str], users: Dict[str, str]) -> bool:
        scheme, _, creds = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":  # RFC 7617: the scheme name is case-insensitive
            return False
        try:
            user, sep, password = base64.b64decode(creds.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        hashed = users.get(user)
        digest = hashlib.sha256(password.encode("utf-8")).digest()
        key = (user, hashed or "")
        with self._lock:
            cached = self._ok.get(key)
        if hashed is not None and cached is not None and hmac.compare_digest(cached, digest):
            return True
        import bcrypt
        with self._bcrypt:
            try:
                ok = bcrypt.checkpw(password.encode("utf-8"), hashed.encode() if hashed else _DUMMY_HASH)
            except ValueError:
                ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._ok = {k: v for k, v in self._ok.items() if k[0] != user}
                self._ok[key] = digest
        return ok
