"""Build the Debian package for the tests, once per test session and version.

`make deb` is what the README tells operators; the upgrade scenario needs a second
package of the same tree with a higher version (KSMCTL_DEB_VERSION, see
packaging/build-deb.sh)."""
from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_SECONDS: Dict[str, float] = {}
_OUT = Path(tempfile.mkdtemp(prefix="ksmctl-test-debs."))


def version() -> str:
    return subprocess.run(["dpkg-parsechangelog", "-S", "Version", "-l", str(REPO / "debian/changelog")],
                          check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


@functools.lru_cache(maxsize=None)
def build(deb_version: Optional[str] = None) -> Path:
    out = _OUT / (deb_version or "default")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, KSMCTL_DEB_OUT=str(out))
    if deb_version:
        env["KSMCTL_DEB_VERSION"] = deb_version
    t0 = time.monotonic()
    p = subprocess.run(["make", "-C", str(REPO), "deb"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=1800)
    BUILD_SECONDS[deb_version or version()] = time.monotonic() - t0
    if p.returncode != 0:
        raise AssertionError("make deb failed:\n" + p.stdout[-8000:])
    debs = sorted(out.glob("ksmctl_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]
