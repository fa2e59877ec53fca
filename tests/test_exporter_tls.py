"""The exporter's HTTP side: landing page, TLS and basic auth from an exporter-toolkit web
config, config errors that name file and key, textfile output.

Keys and certificates are made at test time with the openssl CLI (nothing committed)."""
from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
from pathlib import Path

import bcrypt
import pytest

from ksmctl.config import ExporterConfig
from ksmctl.errors import ConfigError
from ksmctl.export.http import Exporter
from ksmctl.export.webconfig import BasicAuth, load_web_config

from .support import need_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server cert for 127.0.0.1 signed by it, and a client cert signed by it."""
    openssl = need_tool("openssl")
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run([openssl, *args], check=True, cwd=d, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=ksmctl test CA", "-keyout", "ca.key", "-out", "ca.crt")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=" + name,
            "-keyout", name + ".key", "-out", name + ".csr")
        (d / (name + ".ext")).write_text(ext + "\n")
        run("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", name + ".ext", "-out", name + ".crt")
    return d


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def _auth(user: str, pw: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()}


def _start(tmp_path: Path, web: str = None, **kw) -> Exporter:
    cfg = {"listen": "127.0.0.1:%d" % free_port(), **kw}
    if web is not None:
        (tmp_path / "web.yml").write_text(web)
        cfg["web_config"] = str(tmp_path / "web.yml")
    return Exporter(ExporterConfig(**cfg)).start()


def _get(exp: Exporter, path: str = "/metrics", headers=None, tls: ssl.SSLContext = None):
    if tls is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", exp.port, context=tls, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        conn.close()


def test_plain_http_landing_page_metrics_and_404(tmp_path):
    exp = _start(tmp_path)
    try:
        status, body, _ = _get(exp, "/")
        assert status == 200 and b'href="metrics"' in body
        status, body, headers = _get(exp, "/metrics")
        assert status == 200 and b"ksmctl_build_info" in body and headers["Content-Type"].startswith("text/plain")
        status, body, headers = _get(exp, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        status, gz, headers = _get(exp, "/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") in (None, "gzip")
        assert _get(exp, "/nope")[0] == 404
    finally:
        exp.stop()


def test_tls_and_basic_auth(tmp_path, pki):
    web = ("tls_server_config:\n  cert_file: %s\n  key_file: %s\nbasic_auth_users:\n  prometheus: '%s'\n"
           % (pki / "server.crt", pki / "server.key", HASH))
    exp = _start(tmp_path, web)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    try:
        status, body, _ = _get(exp, headers=_auth("prometheus", "s3cret"), tls=ctx)
        assert status == 200 and b"ksmctl_errors_total" in body
        assert _get(exp, headers=_auth("prometheus", "s3cret"), tls=ctx)[0] == 200  # cached check
        status, _, headers = _get(exp, headers=_auth("prometheus", "wrong"), tls=ctx)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert _get(exp, headers=_auth("nobody", "s3cret"), tls=ctx)[0] == 401
        assert _get(exp, tls=ctx)[0] == 401
        assert _get(exp, "/", tls=ctx)[0] == 401  # the landing page is protected too
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            _get(exp, headers=_auth("prometheus", "s3cret"))  # plain HTTP to the TLS port
    finally:
        exp.stop()


def test_client_certificates_required(tmp_path, pki):
    web = ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
           "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  min_version: TLS13\n")
    (pki / "web-mtls.yml").write_text(web)  # relative paths resolve against the web config's directory
    exp = Exporter(ExporterConfig(listen="127.0.0.1:%d" % free_port(), web_config=str(pki / "web-mtls.yml"))).start()
    try:
        anon = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, http.client.HTTPException)):
            _get(exp, tls=anon)
        mutual = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        mutual.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        assert _get(exp, tls=mutual)[0] == 200
    finally:
        exp.stop()


@pytest.mark.parametrize("text,expect", [
    ("basic_auth_users:\n  bob: plaintext\n", "web.yml:2: basic_auth_users: "),
    ("tls_server_config:\n  cert_file: a.crt\n", "tls_server_config: required key 'key_file' is missing"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Always\n",
     "tls_server_config.client_auth_type: 'Always' is not allowed"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "unknown key 'cipher_suites'"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "cannot load cert_file"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    ("basic_auth: {}\n", "unknown key 'basic_auth'; allowed here: basic_auth_users"),
    ("basic_auth_users:\n  carol: '$2b$15$%s'\n" % ("a" * 53), "user 'carol': bcrypt cost 15 is outside 4..14"),
    ("http_server_config:\n  http2: true\n", "this server speaks HTTP/1.1 only"),
    ("http_server_config:\n  headers:\n    Content-Type: text/html\n",
     "HTTP header 'Content-Type' can not be configured; allowed: Strict-Transport-Security"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "'allow' is not allowed; expected one of: deny, sameorigin"),
    ("http_server_config:\n  headers:\n    Content-Security-Policy: \"a\\r\\nSet-Cookie: x\"\n", "must not contain control characters"),
    ("http_server_config:\n  headers:\n    Content-Security-Policy: \"\u2603\"\n", "must be ISO-8859-1"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n",
     "client_allowed_sans requires client_auth_type RequireAnyClientCert or RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: VerifyClientCertIfGiven\n"
     "  client_ca_file: ca.crt\n  client_allowed_sans: [x]\n", "client_allowed_sans requires"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: ca.crt\n",
     "client_ca_file is set but client_auth_type is NoClientCert"),
])
def test_web_config_errors_name_file_and_key(tmp_path, text, expect):
    (tmp_path / "web.yml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_web_config(str(tmp_path / "web.yml"))
    assert str(tmp_path / "web.yml") in e.value.message and expect in e.value.message, e.value.message


def test_highest_allowed_bcrypt_cost_loads(tmp_path):
    (tmp_path / "web.yml").write_text("basic_auth_users:\n  dave: '$2b$14$%s'\n" % ("a" * 53))
    assert load_web_config(str(tmp_path / "web.yml")).users["dave"].startswith("$2b$14$")


def test_bcrypt_result_is_cached(monkeypatch):
    auth, users = BasicAuth(), {"u": HASH}
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    header = _auth("u", "s3cret")["Authorization"]
    assert auth.check(header, users) and auth.check(header, users) and len(calls) == 1
    assert not auth.check(_auth("u", "other")["Authorization"], users) and len(calls) == 2
    assert not auth.check(header, {"u": HASH.replace("$04$", "$05$", 1)})  # a rotated hash is checked afresh
    assert len(calls) == 3
    assert not auth.check("Basic !!!", users) and not auth.check("Bearer x", users) and not auth.check(None, users)


def test_textfile_written_atomically_each_tick(tmp_path):
    from .test_metrics_golden import FakeVms, _ticks
    out = tmp_path / "ksmctl.prom"
    exp = Exporter(ExporterConfig(enabled=False, textfile=str(out)))
    t1, t2 = _ticks(tmp_path, {}, {}, FakeVms())
    exp.observer(t1)
    exp.observer(t2)
    text = out.read_text()
    assert "ksm_memory_saved_bytes 1.04448e+08" in text and "_created" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ksmctl.prom")] == []
    exp.config = ExporterConfig(enabled=False, textfile=str(tmp_path / "no-such-dir" / "x.prom"))
    exp.observer(t2)  # counted, not raised
    assert 'ksmctl_errors_total{source="exporter"} 1.0' in exp.render().decode()
