"""The daemon's /metrics endpoint: an HTTP(S) server that holds against its clients.

Our own ThreadingHTTPServer, bounded so that no client can take what the controller
needs: at most `connection_limit()` connections (one thread and one fd each; more are
closed at once), a deadline for each request (TLS handshake, request line and headers
together), a write timeout, and bcrypt checks one at a time. Basic auth answers 401 before
anything is rendered. The web config (webconfig.py) is consulted per connection and
request, so it can change under a running server.
"""
from __future__ import annotations

import errno
import gzip
import html
import io
import logging
import resource
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from ksmctl import __version__
from ksmctl.config import ExporterConfig
from ksmctl.errors import ConfigError, ErrorSource
from ksmctl.export.metrics import MetricsCollector, render_text
from ksmctl.export.textfile import write_textfile
from ksmctl.export.webconfig import BasicAuth, WebConfigSource

log = logging.getLogger("ksmctl.exporter")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A request must be complete this long after the connection is ready for it (accepted, or
# the previous response sent): slowloris clients and idle keep-alives are closed after it.
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
_FD_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def connection_limit() -> int:
    """At most MAX_CONNECTIONS, and never more than half the fd limit: the other half stays
    for the controller's own reads of /sys and /proc, libvirt and logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 2))


def parse_listen(listen: str) -> Tuple[str, int]:
    """'127.0.0.1:19839', '[::1]:19839', ':19839' (all addresses) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _DeadlineReader(io.RawIOBase):
    """Reads from the socket until the handler's deadline: a per-recv timeout alone lets a
    client that sends one byte every few seconds hold its thread forever."""

    def __init__(self, sock: socket.socket, handler: Any) -> None:
        self.sock = sock
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        remaining = self.handler.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("request not complete within %gs" % READ_TIMEOUT)
        self.sock.settimeout(remaining)
        return self.sock.recv_into(b)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 32

    def __init__(self, addr: Tuple[str, int], handler: Any, web: WebConfigSource, limit: int) -> None:
        self.web = web
        self.limit = limit
        self.tls = web.current().tls is not None
        self._slots = threading.BoundedSemaphore(limit)
        self._full_logged = 0.0
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

    def get_request(self) -> Any:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in _FD_SHORTAGE:  # the connection stays queued: do not spin on it
                self._warn("cannot accept a connection: %s" % (e.strerror or e))
                time.sleep(0.1)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._warn("%d connections open, the limit: closing new ones until some finish" % self.limit)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread: the TLS handshake happens here, not in accept().
        if self.tls:
            active = self.web.current()
            assert active.tls is not None
            request.settimeout(READ_TIMEOUT)  # CPython: a deadline for the whole handshake
            try:
                request = active.tls.wrap_socket(request, server_side=True)
                refusal = active.sans_refusal(request.getpeercert())
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                _close(request)
                return
            if refusal is not None:
                log.info("refused %s: %s", client_address[0], refusal)
                _close(request)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._full_logged > 60:  # once a minute at most: a flood must not flood the log
            self._full_logged = now
            log.warning("exporter: %s", msg)


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


class Exporter:
    """Serves the collector's metrics over HTTP(S) and/or writes them to a textfile.

    observer(rec) is appended to Daemon.observers; stop() to Daemon.on_shutdown. The
    registry holds the tick's families (MetricsCollector, rendered once per tick) and the
    daemon's own process_* metrics (ProcessCollector, read per scrape; self_proc is where
    it reads /proc/self, not the host's /proc the collectors may be pointed at)."""

    def __init__(self, config: ExporterConfig, registry: Optional[CollectorRegistry] = None,
                 metrics: Optional[MetricsCollector] = None, web: Optional[WebConfigSource] = None,
                 self_proc: str = "/proc") -> None:
        self.config = config
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.metrics = metrics or MetricsCollector(self.registry, per_vm=config.per_vm)
        self.process = ProcessCollector(proc=self_proc, registry=self.registry)
        self.web = web or WebConfigSource(config.web_config, on_error=lambda _msg: self.metrics.count_error(ErrorSource.EXPORTER))
        self.auth = BasicAuth()
        self.server: Optional[_Server] = None
        self.thread: Optional[threading.Thread] = None
        self._cache: Tuple[int, bytes] = (-1, b"")
        self._cache_lock = threading.Lock()

    # -- rendering --------------------------------------------------------------------------
    def render(self) -> bytes:
        """The tick's text exposition (format 0.0.4, which every Prometheus reads; like
        node_exporter, no OpenMetrics negotiation). Cached per tick: it only changes when a
        tick is observed."""
        gen = self.metrics.generation
        with self._cache_lock:
            if self._cache[0] == gen:
                return self._cache[1]
        body = render_text(self.metrics)
        if self.metrics.generation == gen:
            with self._cache_lock:
                self._cache = (gen, body)
        return body

    def scrape(self) -> bytes:
        """What /metrics serves: the tick's families and this process's, read now."""
        return self.render() + render_text(self.process)

    def observer(self, rec: Any) -> None:
        """After each tick: count it, then render once here in the daemon's thread, so
        scrapes (and the textfile) only copy bytes."""
        self.metrics.observe(rec)
        if self.server is not None or self.config.textfile:
            try:
                self.render()
            except Exception as e:
                self.metrics.count_error(ErrorSource.EXPORTER)
                log.error("cannot render metrics: %s", e)
        if self.config.textfile:
            self.write_textfile()

    def write_textfile(self) -> None:
        problem = write_textfile(self.config.textfile or "", self.render())
        if problem is not None:
            self.metrics.count_error(ErrorSource.EXPORTER)
            log.error("%s", problem)

    # -- serving ----------------------------------------------------------------------------
    def start(self) -> "Exporter":
        host, port = parse_listen(self.config.listen)
        limit = connection_limit()
        try:
            self.server = _Server((host, port), self._handler(), self.web, limit)
        except OSError as e:
            raise ConfigError("exporter.listen: cannot listen on %s: %s (set exporter.listen in the config, "
                              "or exporter.enabled: false)" % (self.config.listen, e.strerror or e)) from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="ksmctl-exporter", daemon=True)
        self.thread.start()
        log.info("exporter listening on %s://%s/metrics%s, at most %d connections",
                 "https" if self.server.tls else "http", self.config.listen,
                 ", basic auth" if self.web.current().users else "", limit)
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
            deadline = 0.0

            def setup(self) -> None:
                super().setup()
                self.rfile.close()
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

            def handle_one_request(self) -> None:
                self.deadline = time.monotonic() + READ_TIMEOUT
                super().handle_one_request()

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, body: bytes, ctype: str, headers: Dict[str, str],
                      extra: Optional[Dict[str, str]] = None) -> None:
                self.connection.settimeout(WRITE_TIMEOUT)
                if "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024:
                    body = gzip.compress(body, compresslevel=1)
                    extra = dict(extra or {}, **{"Content-Encoding": "gzip"})
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                active = exp.web.current()
                headers = active.headers
                if active.users and not exp.auth.check(self.headers.get("Authorization"), active.users):
                    self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", headers,
                               {"WWW-Authenticate": 'Basic realm="ksmctl"'})
                    return
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = exp.scrape()
                    except Exception as e:  # never a traceback to the scraper
                        log.error("cannot render metrics: %s", e)
                        exp.metrics.count_error(ErrorSource.EXPORTER)
                        self._send(500, b"cannot render metrics\n", "text/plain; charset=utf-8", headers)
                        return
                    self._send(200, body, CONTENT_TYPE, headers)
                elif path == "/":
                    self._send(200, exp.landing_page(), "text/html; charset=utf-8", headers)
                else:
                    self._send(404, b"Not found: try /metrics\n", "text/plain; charset=utf-8", headers)

            do_HEAD = do_GET

        return Handler


def build_exporter(config: ExporterConfig, serve: bool = True) -> Exporter:
    """From the daemon's config: validates the web config (ConfigError naming the file)."""
    exp = Exporter(config)
    if serve and config.enabled:
        exp.start()
    return exp
