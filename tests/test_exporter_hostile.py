"""The metrics endpoint against clients that misbehave, and a web config that changes under
a running daemon. Black-box: a real `ksmctl daemon --dry-run` process on fixture /sys and
/proc trees, real sockets on 127.0.0.1. Every wait has a deadline; every loop is bounded."""
from __future__ import annotations

import base64
import http.client
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import bcrypt
import pytest

from ksmctl.config import ExporterConfig
from ksmctl.export.http import READ_TIMEOUT, Exporter
from ksmctl.export.webconfig import BCRYPT_MAX_COST, RETRY_SECONDS

from .daemon_proc import ALWAYS_ON_POLICY, DaemonProc, REPO
from .fixtures import make_proc, make_sys
from .support import need_tool, wait_for
from .test_exporter_tls import free_port, pki  # noqa: F401  (fixture)

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def issue(pki_dir: Path, name: str, ext: str) -> Path:
    """A key and a certificate signed by the pki fixture's CA, with extensions `ext`."""
    openssl = need_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, cwd=pki_dir, capture_output=True, timeout=60)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=" + name,
        "-keyout", name + ".key", "-out", name + ".csr")
    (pki_dir / (name + ".ext")).write_text(ext + "\n")
    run("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", name + ".ext", "-out", name + ".crt")
    return pki_dir / (name + ".crt")


class ExporterDaemon(DaemonProc):
    """DaemonProc on fixture trees with the exporter on, optionally under an fd limit."""

    def __init__(self, tmp: Path, web: Optional[str] = None, nofile: Optional[int] = None,
                 exporter: Optional[Dict[str, object]] = None) -> None:
        self.port = free_port()
        self.nofile = nofile
        run_root = tmp / "run"
        run_root.mkdir(exist_ok=True)
        exp: Dict[str, object] = {"enabled": True, "listen": "127.0.0.1:%d" % self.port, **(exporter or {})}
        if web is not None:
            (tmp / "web.yml").write_text(web)
            exp["web_config"] = str(tmp / "web.yml")
        super().__init__(tmp, ALWAYS_ON_POLICY, args=["--dry-run"], extra_config={
            "sys_root": str(make_sys(tmp / "sys")), "proc_root": str(make_proc(tmp / "proc")),
            "run_root": str(run_root), "exporter": exp})

    def start(self) -> "ExporterDaemon":
        limit = self.nofile

        def lower() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", str(self.config), "daemon"]
                                     + self.args, stdout=self._logf, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO), preexec_fn=lower)
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        def up() -> bool:
            assert self.alive(), "daemon exited:\n" + self.log_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(up, timeout, "the exporter to listen")

    def get(self, path: str = "/metrics", headers: Optional[Dict[str, str]] = None,
            tls: Optional[ssl.SSLContext] = None, timeout: float = 10):
        if tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", self.port, context=tls,
                                                                           timeout=timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read().decode(), dict(r.getheaders())
        finally:
            conn.close()


def _basic(user: str, pw: str, scheme: str = "Basic") -> Dict[str, str]:
    return {"Authorization": scheme + " " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()}


def _try_get(d: ExporterDaemon, **kw):
    try:
        return d.get(**kw)
    except (OSError, http.client.HTTPException) as e:
        return e


# -- clients that hold connections ------------------------------------------------------------
def test_idle_flood_and_slowloris_under_a_low_fd_limit(tmp_path):
    """200 silent sockets and 5 that trickle header lines, against a daemon limited to 64 fds:
    the controller keeps ticking with no read errors, trickling clients are cut at the request
    deadline, and a normal scrape answers once the held connections time out."""
    with ExporterDaemon(tmp_path, nofile=64) as d:
        d.wait_listening()
        idle: List[socket.socket] = []
        slow: List[socket.socket] = []
        try:
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            t0 = time.monotonic()
            assert d.get()[0] == 200  # accepted after the trickling ones: they hold slots now
            for _ in range(200):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", d.port))
                idle.append(s)
            closed_at: Dict[int, float] = {}

            def trickle() -> None:
                for i in range(int(READ_TIMEOUT) + 8):  # bounded: one header line a second
                    for n, s in enumerate(slow):
                        if n in closed_at:
                            continue
                        try:
                            s.sendall(b"X-Slow-%d: %d\r\n" % (n, i))
                            s.settimeout(0.01)
                            if s.recv(1) == b"":
                                closed_at[n] = time.monotonic() - t0
                        except socket.timeout:
                            pass
                        except OSError:
                            closed_at[n] = time.monotonic() - t0
                    if len(closed_at) == len(slow):
                        return
                    time.sleep(1)
            t = threading.Thread(target=trickle, daemon=True)
            t.start()
            # The controller keeps ticking during the flood: its state file's `updated` advances.
            first = wait_for(d.state, 10, "a state file")["updated"]
            wait_for(lambda: (d.state() or {}).get("updated", 0) > first + 1.0, 15,
                     "the controller to keep ticking during the flood")
            t.join(timeout=READ_TIMEOUT + 15)
            assert len(closed_at) == len(slow), "trickling clients still open: %r" % closed_at
            # Cut at the request deadline, although a byte arrived every second.
            assert READ_TIMEOUT - 1 < min(closed_at.values()) and max(closed_at.values()) < READ_TIMEOUT + 4, closed_at
            # A well-behaved scrape answers once the held connections have timed out.
            res = wait_for(lambda: (lambda r: r if isinstance(r, tuple) and r[0] == 200 else None)(
                _try_get(d, timeout=3)), READ_TIMEOUT + 20, "a scrape to answer after the flood", interval=0.5)
            body = res[1]
            assert 'ksmctl_errors_total{source="proc"} 0.0' in body and 'ksmctl_errors_total{source="sysfs"} 0.0' in body
            assert "process_max_fds 64.0" in body
            assert "connections open, the limit" in d.log_text()
            assert "Too many open files" not in d.log_text()
            assert d.alive()
        finally:
            for s in idle + slow:
                s.close()


def test_unbindable_listen_address_is_a_config_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = ExporterDaemon(tmp_path, exporter={"listen": "127.0.0.1:%d" % port})
        d.start()
        assert d.proc is not None
        rc = d.proc.wait(timeout=60)
        d.stop()
        assert rc == 2, d.log_text()
        assert "exporter.listen: cannot listen on 127.0.0.1:%d: Address already in use" % port in d.log_text()
        assert "Traceback" not in d.log_text()


def test_broken_web_config_at_start_exits_2_naming_file_and_user(tmp_path):
    fake31 = "$2b$31$" + "a" * 53
    d = ExporterDaemon(tmp_path, web="basic_auth_users:\n  alice: '%s'\n" % fake31)
    d.start()
    assert d.proc is not None and d.proc.wait(timeout=60) == 2
    d.stop()
    text = d.log_text()
    assert str(tmp_path / "web.yml") in text and "user 'alice': bcrypt cost 31 is outside 4..%d" % BCRYPT_MAX_COST in text
    assert "Traceback" not in text


# -- what the daemon serves -------------------------------------------------------------------
def test_served_metrics_have_process_metrics_the_textfile_does_not(tmp_path):
    out = tmp_path / "ksmctl.prom"
    with ExporterDaemon(tmp_path, exporter={"textfile": str(out)}) as d:
        d.wait_listening()
        status, body, _ = d.get()
        assert status == 200
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                     "process_start_time_seconds"):
            assert "\n%s " % name in body, name
        start = float(body.split("\nprocess_start_time_seconds ")[1].split()[0])
        assert abs(start - wait_for(d.state, 10, "the state file")["started"]) < 5
        wait_for(out.exists, 10, "the textfile")
        assert "ksmctl_build_info" in out.read_text() and "process_" not in out.read_text()


def test_basic_scheme_is_case_insensitive_and_headers_are_sent(tmp_path):
    web = ("basic_auth_users:\n  prometheus: '%s'\nhttp_server_config:\n  http2: false\n  headers:\n"
           "    X-Frame-Options: deny\n    Content-Security-Policy: \"default-src 'none'\"\n" % HASH)
    with ExporterDaemon(tmp_path, web=web) as d:
        d.wait_listening()
        for scheme in ("Basic", "basic", "BASIC"):
            status, _, headers = d.get(headers=_basic("prometheus", "s3cret", scheme))
            assert status == 200, scheme
            assert headers["X-Frame-Options"] == "deny" and headers["Content-Security-Policy"] == "default-src 'none'"
        assert d.get(headers=_basic("prometheus", "s3cret", "Bearer"))[0] == 401
        status, _, headers = d.get(headers=_basic("prometheus", "nope"))
        assert status == 401 and headers["X-Frame-Options"] == "deny"


def test_client_allowed_sans_are_enforced(tmp_path, pki):  # noqa: F811
    issue(pki, "prom", "subjectAltName=DNS:prom.example,email:ops@example.org\nextendedKeyUsage=clientAuth")
    issue(pki, "other", "subjectAltName=DNS:other.example\nextendedKeyUsage=clientAuth")
    issue(pki, "byip", "subjectAltName=IP:::1\nextendedKeyUsage=clientAuth")
    web = ("tls_server_config:\n  cert_file: %s/server.crt\n  key_file: %s/server.key\n"
           "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: %s/ca.crt\n"
           "  client_allowed_sans: [prom.example, '::1']\n" % (pki, pki, pki))
    with ExporterDaemon(tmp_path, web=web) as d:
        d.wait_listening()

        def client(name: str) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            ctx.load_cert_chain(str(pki / (name + ".crt")), str(pki / (name + ".key")))
            return ctx
        assert d.get(tls=client("prom"))[0] == 200
        assert d.get(tls=client("byip"))[0] == 200  # IPs compare in their canonical text form
        for refused in ("other", "client"):  # another SAN; no SAN at all
            with pytest.raises((OSError, http.client.HTTPException)):
                d.get(tls=client(refused))
        wait_for(lambda: "not in client_allowed_sans" in d.log_text(), 10, "the refusal in the log")


# -- the web config changes under a running daemon --------------------------------------------
def _served_cn(d: ExporterDaemon, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return subject["commonName"]


def test_rotation_without_restart_and_a_broken_config_keeps_the_last_good(tmp_path, pki):  # noqa: F811
    issue(pki, "server2", "subjectAltName=IP:127.0.0.1")
    live = tmp_path / "tls"
    live.mkdir()
    for src, dst in (("server.crt", "cur.crt"), ("server.key", "cur.key")):
        (live / dst).write_bytes((pki / src).read_bytes())
    web = "tls_server_config:\n  cert_file: tls/cur.crt\n  key_file: tls/cur.key\n"
    ca = pki / "ca.crt"
    tls = ssl.create_default_context(cafile=str(ca))
    with ExporterDaemon(tmp_path, web=web) as d:
        d.wait_listening()
        assert _served_cn(d, ca) == "server"
        # Rotate the certificate as certbot does: new files renamed over the old ones.
        for src, dst in (("server2.key", "cur.key"), ("server2.crt", "cur.crt")):
            (live / (dst + ".new")).write_bytes((pki / src).read_bytes())
            os.replace(live / (dst + ".new"), live / dst)
        wait_for(lambda: _served_cn(d, ca) == "server2", 10, "the rotated certificate to be served")
        # Add a user: the next request needs a password.
        (tmp_path / "web.yml").write_text(web + "basic_auth_users:\n  prometheus: '%s'\n" % HASH)
        wait_for(lambda: d.get(tls=tls)[0] == 401, 10, "the new user to be required")
        assert d.get(tls=tls, headers=_basic("prometheus", "s3cret"))[0] == 200
        # Break it: the last good config keeps serving, the error is logged and counted once.
        (tmp_path / "web.yml").write_text(web + "basic_auth_users:\n  prometheus: plaintext\n")
        # It is checked at each connection: a scrape finds it.
        wait_for(lambda: d.get(tls=tls, headers=_basic("prometheus", "s3cret"))[0] == 200
                 and "web config rejected" in d.log_text(), 10, "the rejection in the log")
        end = time.monotonic() + RETRY_SECONDS + 1.5  # past a retry of the broken version
        for _ in range(100):
            status, body, _ = d.get(tls=tls, headers=_basic("prometheus", "s3cret"))
            assert status == 200 and _served_cn(d, ca) == "server2"
            if time.monotonic() > end:
                break
            time.sleep(0.5)
        assert 'ksmctl_errors_total{source="exporter"} 1.0' in body, body
        assert "basic_auth_users" in d.log_text().split("web config rejected")[1].splitlines()[0]
        # Switching to plain HTTP needs a restart: refused, counted.
        (tmp_path / "web.yml").write_text("basic_auth_users: {}\n")
        wait_for(lambda: d.get(tls=tls, headers=_basic("prometheus", "s3cret"))[0] == 200
                 and "switching between HTTP and HTTPS needs a restart" in d.log_text(), 10, "the refusal")
        status, body, _ = d.get(tls=tls, headers=_basic("prometheus", "s3cret"))
        assert status == 200 and 'ksmctl_errors_total{source="exporter"} 2.0' in body


# -- TLS options that must mean what they say (in-process server, real sockets) --------------
@pytest.mark.parametrize("prefer,expect", [(True, "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                           (False, "ECDHE-ECDSA-AES128-GCM-SHA256")])
def test_prefer_server_cipher_suites_is_honoured(tmp_path, pki, prefer, expect):  # noqa: F811
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: %s/server.crt\n  key_file: %s/server.key\n  max_version: TLS12\n"
        "  prefer_server_cipher_suites: %s\n" % (pki, pki, "true" if prefer else "false"))
    exp = Exporter(ExporterConfig(listen="127.0.0.1:%d" % free_port(), web_config=str(tmp_path / "web.yml"))).start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")  # client's order
        with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.cipher()[0] == expect
    finally:
        exp.stop()


def test_unit_sets_an_fd_limit_that_leaves_room_for_the_controller():
    from .test_unit_file import SHIPPED, _directives
    limit = _directives(SHIPPED.read_text()).get(("Service", "LimitNOFILE"), [])
    assert len(limit) == 1 and limit[0].isdigit(), limit
    # min(64, half the limit) connections: at 1024 the exporter is capped by 64, not the limit.
    assert int(limit[0]) // 2 >= 64 and int(limit[0]) <= 65536
