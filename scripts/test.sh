#!/usr/bin/env bash
# Install everything the test suite needs on a Debian 12 KVM host (as root) and run the
# whole suite: real KSM, real libvirtd + QEMU guests, real Prometheus, real ksmtuned.
# Idempotent: a second run installs nothing new. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests write /sys/kernel/mm/ksm and start libvirtd)" >&2
    exit 2
fi

APT_PACKAGES="python3-venv gcc pkg-config openssl cpio busybox-static qemu-system-x86 libvirt-daemon
  libvirt-daemon-driver-qemu libvirt-clients libvirt-dev prometheus ksmtuned systemd
  debhelper dh-virtualenv dpkg-dev python3-dev python3-pip python3-yaml ca-certificates lintian
  mmdebstrap e2fsprogs git"
# (second line: `make deb` and its lintian check; mmdebstrap + e2fsprogs build the
# systemd guest image of tests/test_deb_guest.py, which QEMU boots)
missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "== apt-get install:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian's ksmtuned package must not leave its own daemon running: it writes the same knobs.
pkill -x ksmtuned 2>/dev/null || true

echo "== guest kernel for the libvirt lab"
bash tests/lab/get-kernel.sh

# pip warns about this machine's unused local index folders; keep the log readable.
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
echo "== pip install -e .[test,bench]"
quiet_pip .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'

echo "== mypy (normal over ksmctl/, strict over the kernel and policy packages)"
.venv/bin/mypy ksmctl
.venv/bin/mypy --strict --follow-imports=silent ksmctl/kernel ksmctl/policy

# RHEL 9 runs Python 3.9: the pure-Python core (policies, decisions, readers) and the
# estimator's counting (numpy 2.0 is the last for 3.9) must work there.
PY39=$(ls -d /root/.pyenv/versions/3.9*/bin/python3.9 2>/dev/null | head -n1 || true)
PY39=${PY39:-$(command -v python3.9 || true)}
if [ -n "$PY39" ]; then
    echo "== Python 3.9: $PY39"
    [ -x .venv39/bin/python ] || "$PY39" -m venv .venv39
    quiet_pip .venv39/bin/pip install -q --disable-pip-version-check -e '.[estimate]' pytest pytest-timeout hypothesis
    .venv39/bin/python -m pytest -q -p no:cacheprovider -m "not kernel and not lab" tests/test_policy_loader.py \
        tests/test_decide.py tests/test_collectors.py tests/test_config.py tests/test_replay.py \
        tests/test_estimate_count.py tests/test_estimate.py tests/test_doctor.py tests/test_reload.py \
        tests/test_knob_table.py tests/test_ownership.py tests/test_cli_knobs.py tests/test_kernel_settings.py
elif [ "${CI:-}" = "true" ]; then
    echo "scripts/test.sh: no Python 3.9 interpreter found (pyenv) in CI" >&2
    exit 1
fi

# The systemd guest for the Debian package's tests: built once, cached under
# /var/cache/ksmctl-lab keyed on its inputs (tests/guest/build-image.sh).
echo "== systemd guest image"
sh tests/guest/build-image.sh | tail -n1

echo "== pytest (whole suite)"
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
# pytest's 5 means no tests were collected: that is a failure here, never a pass.
[ $rc = 5 ] && { echo "no tests were collected" >&2; exit 1; }
exit $rc
