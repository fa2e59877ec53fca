# The two commands the README gives for a fresh Debian 12 KVM host (as root):
#   make run    start the daemon on this host with the default policy
#   make test   install what the tests need and run the whole suite
#   make deb    build dist/ksmctl_<version>_<arch>.deb (debhelper + dh-virtualenv)
.PHONY: run test bench deb

.venv/.installed: pyproject.toml
	@[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -e .
	@touch $@

run: .venv/.installed
	.venv/bin/ksmctl daemon --policy default

test:
	bash scripts/test.sh

bench: .venv/.installed
	.venv/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	.venv/bin/python bench/run_all.py

deb:
	bash packaging/build-deb.sh
