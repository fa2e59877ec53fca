"""The daemon's /metrics endpoint: HTTP(S) server, exporter-toolkit web config, textfile.

The web config file has the format of the Prometheus exporter-toolkit (the `--web.config.file`
of node_exporter), so operators secure ksmctl the way they already secure node_exporter:
`tls_server_config` (cert_file, key_file, client_auth_type, client_ca_file, min_version,
max_version, client_allowed_sans) and `basic_auth_users` (user: bcrypt hash). Relative
paths are relative to the web config file, as in the exporter-toolkit.

The server is our own ThreadingHTTPServer: TLS handshakes run in the request thread (a
slow client cannot stall the listener), and basic auth answers 401 before anything is
rendered. Successful bcrypt checks are cached (bcrypt costs ~0.1-0.3 s by design; a
scrape every few seconds must not pay it each time).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import html
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client.registry import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import __version__
from .config import ExporterConfig
from .errors import ConfigError, KsmctlError
from .fsutil import atomic_write
from .metrics import MetricsCollector, render_text
from .yamlload import YamlProblem, load_yaml, validate

log = logging.getLogger("ksmctl.exporter")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# A valid bcrypt hash of a random string: unknown users are checked against it so that a
# wrong user name takes as long as a wrong password (no user enumeration by timing).
_DUMMY_HASH = b"$2b$10$3Ie/DdDZ0JbUPJ1Kx4h27uSvbYzGmpcGGAiEAP5sINdLhHuzbBhSC"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Model):
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: Optional[str] = None
    client_allowed_sans: Optional[List[str]] = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True  # OpenSSL's server order is used either way

    @field_validator("client_auth_type")
    @classmethod
    def _auth(cls, v: str) -> str:
        if v not in CLIENT_AUTH_TYPES:
            raise ValueError("expected one of " + ", ".join(CLIENT_AUTH_TYPES))
        return v

    @field_validator("min_version", "max_version")
    @classmethod
    def _ver(cls, v: str) -> str:
        if v not in TLS_VERSIONS:
            raise ValueError("expected one of " + ", ".join(TLS_VERSIONS))
        return v


class HttpServerConfig(_Model):
    http2: bool = True  # accepted for compatibility; this server speaks HTTP/1.1
    headers: Dict[str, str] = Field(default_factory=dict)


class WebConfig(_Model):
    tls_server_config: Optional[TlsServerConfig] = None
    http_server_config: HttpServerConfig = HttpServerConfig()
    basic_auth_users: Dict[str, str] = Field(default_factory=dict)

    @field_validator("basic_auth_users")
    @classmethod
    def _hashes(cls, v: Dict[str, str]) -> Dict[str, str]:
        for user, h in v.items():
            if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60:
                raise ValueError("user %r: expected a bcrypt hash ($2y$..., 60 characters; "
                                 "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)" % user)
        return v


def load_web_config(path: str) -> WebConfig:
    """Parse and check a web config; every problem names the file, line and key."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("%s: cannot read web config: %s" % (path, e.strerror or e)) from None
    try:
        data, lines = load_yaml(text, path)
        wc = validate(WebConfig, data, path, lines)
    except YamlProblem as e:
        raise ConfigError(str(e)) from None
    tls = wc.tls_server_config
    if tls is not None:
        base = p.resolve().parent
        fixed = {k: str(base / getattr(tls, k)) for k in ("cert_file", "key_file", "client_ca_file")
                 if getattr(tls, k)}
        tls = tls.model_copy(update=fixed)
        wc = wc.model_copy(update={"tls_server_config": tls})
        if tls.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") \
                and not tls.client_ca_file:
            raise ConfigError("%s: tls_server_config.client_auth_type: %s needs client_ca_file"
                              % (path, tls.client_auth_type))
        if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
            raise ConfigError("%s: tls_server_config: min_version %s is above max_version %s"
                              % (path, tls.min_version, tls.max_version))
        ssl_context(wc, path)  # fail at start, naming the file, not at the first scrape
    return wc


def ssl_context(wc: WebConfig, path: str = "web config") -> ssl.SSLContext:
    tls = wc.tls_server_config
    assert tls is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
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
    # cannot request a certificate without verifying it, so both verify against the CA
    # when one is given and are refused at load time otherwise.
    mode = tls.client_auth_type
    if mode == "NoClientCert":
        ctx.verify_mode = ssl.CERT_NONE
    elif mode in ("VerifyClientCertIfGiven", "RequestClientCert"):
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
    if mode in ("RequestClientCert", "RequireAnyClientCert") and not tls.client_ca_file:
        raise ConfigError("%s: tls_server_config.client_auth_type %s: ksmctl verifies client certificates, "
                          "set client_ca_file" % (path, mode))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


class BasicAuth:
    """bcrypt check with a cache of successful (user, sha256(password)) pairs."""

    def __init__(self, users: Dict[str, str]) -> None:
        self.users = {u: h.encode() for u, h in users.items()}
        self._ok: Dict[str, bytes] = {}
        self._lock = threading.Lock()

    def check(self, header: Optional[str]) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        digest = hashlib.sha256(password.encode("utf-8")).digest()
        with self._lock:
            cached = self._ok.get(user)
        if cached is not None and hmac.compare_digest(cached, digest):
            return True
        import bcrypt
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode("utf-8"), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                self._ok[user] = digest
        return ok


def parse_listen(listen: str) -> Tuple[str, int]:
    """'127.0.0.1:19839', '[::1]:19839', ':19839' (all addresses) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: Optional[ssl.SSLContext] = None

    def __init__(self, addr: Tuple[str, int], handler: Any, tls: Optional[ssl.SSLContext]) -> None:
        self.tls = tls
        host = addr[0]
        if host == "" and socket.has_ipv6:
            self.address_family = socket.AF_INET6
            addr = ("::", addr[1])
        elif ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack like Go's ":port"
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the request's own thread: the TLS handshake happens here, not in accept().
        if self.tls is not None:
            request.settimeout(10)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                try:
                    request.close()
                except OSError:
                    pass
                return
        super().finish_request(request, client_address)


class Exporter:
    """Serves the collector's metrics over HTTP(S) and/or writes them to a textfile.

    observer(rec) is appended to Daemon.observers; stop() to Daemon.on_shutdown."""

    def __init__(self, config: ExporterConfig, registry: Optional[CollectorRegistry] = None,
                 metrics: Optional[MetricsCollector] = None, web_config: Optional[WebConfig] = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.metrics = metrics or MetricsCollector(self.registry, per_vm=config.per_vm)
        self.web = web_config or (load_web_config(config.web_config) if config.web_config else WebConfig())
        if self.web.basic_auth_users:
            from .extras import require
            require("auth", "basic_auth_users in %s" % (config.web_config or "the web config"))
        self.auth = BasicAuth(self.web.basic_auth_users) if self.web.basic_auth_users else None
        self.tls = ssl_context(self.web, config.web_config or "web config") if self.web.tls_server_config else None
        self.server: Optional[_Server] = None
        self.thread: Optional[threading.Thread] = None
        self._cache: Tuple[int, bytes] = (-1, b"")
        self._cache_lock = threading.Lock()

    # -- rendering --------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition (format 0.0.4, which every Prometheus reads; like node_exporter,
        no OpenMetrics negotiation). Cached per tick: it only changes when a tick is observed."""
        gen = self.metrics.generation
        with self._cache_lock:
            if self._cache[0] == gen:
                return self._cache[1]
        body = render_text(self.registry)
        if self.metrics.generation == gen:
            with self._cache_lock:
                self._cache = (gen, body)
        return body

    def observer(self, rec: Any) -> None:
        """After each tick: count it, then render once here in the daemon's thread, so
        scrapes (and the textfile) only copy bytes."""
        self.metrics.observe(rec)
        if self.server is not None or self.config.textfile:
            try:
                self.render()
            except Exception as e:
                self.metrics.count_error("exporter")
                log.error("cannot render metrics: %s", e)
        if self.config.textfile:
            self.write_textfile()

    def write_textfile(self) -> None:
        """Atomic: node_exporter never reads a half-written file."""
        path = Path(self.config.textfile or "")
        try:
            atomic_write(path, self.render())
        except OSError as e:
            self.metrics.count_error("exporter")
            log.error("cannot write textfile %s: %s", path, e.strerror or e)

    # -- serving ----------------------------------------------------------------------------
    def start(self) -> "Exporter":
        host, port = parse_listen(self.config.listen)
        try:
            self.server = _Server((host, port), self._handler(), self.tls)
        except OSError as e:
            raise KsmctlError("exporter: cannot listen on %s: %s (set exporter.listen in the config, "
                              "or exporter.enabled: false)" % (self.config.listen, e.strerror or e)) from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="ksmctl-exporter", daemon=True)
        self.thread.start()
        log.info("exporter listening on %s://%s/metrics%s", "https" if self.tls else "http", self.config.listen,
                 ", basic auth" if self.auth else "")
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def landing_page(self) -> bytes:
        rec = self.metrics._rec
        policy = html.escape(rec.policy.policy.name) if rec is not None else "(no tick yet)"
        return ("<!DOCTYPE html><html><head><title>ksmctl exporter</title></head><body>"
                "<h1>ksmctl exporter</h1><p>KSM controller and exporter, version %s. Policy: %s.</p>"
                "<p><a href=\"metrics\">Metrics</a></p></body></html>\n" % (html.escape(__version__), policy)).encode()

    def _handler(self) -> Any:
        exp = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "ksmctl/" + __version__
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
                if "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024:
                    body = gzip.compress(body, compresslevel=1)
                    extra = dict(extra or {}, **{"Content-Encoding": "gzip"})
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in exp.web.http_server_config.headers.items():
                    self.send_header(k, v)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                if exp.auth is not None and not exp.auth.check(self.headers.get("Authorization")):
                    self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                               {"WWW-Authenticate": 'Basic realm="ksmctl"'})
                    return
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = exp.render()
                    except Exception as e:  # never a traceback to the scraper
                        log.error("cannot render metrics: %s", e)
                        exp.metrics.count_error("exporter")
                        self._send(500, b"cannot render metrics\n", "text/plain; charset=utf-8")
                        return
                    self._send(200, body, CONTENT_TYPE)
                elif path == "/":
                    self._send(200, exp.landing_page(), "text/html; charset=utf-8")
                else:
                    self._send(404, b"Not found: try /metrics\n", "text/plain; charset=utf-8")

            do_HEAD = do_GET

        return Handler


def build_exporter(config: ExporterConfig, serve: bool = True) -> Exporter:
    """From the daemon's config: validates the web config (ConfigError naming the file)."""
    exp = Exporter(config)
    if serve and config.enabled:
        exp.start()
    return exp
