#!/usr/bin/env bash
# `make deb`: build dist/ksmctl_<version>_<arch>.deb with Debian's own tooling
# (dpkg-buildpackage, debhelper, dh-virtualenv) from a clean copy of this tree.
#
# The copy holds the project's files only (git's tracked and untracked-but-not-ignored
# files in a checkout; everything but build output otherwise), so nothing from .venv or
# an earlier build leaks in, and dpkg-buildpackage's ../ output lands under build/deb/.
# KSMCTL_DEB_VERSION=V builds the same tree as version V (a changelog entry is added to
# the copy): the upgrade test installs N, then N+1. KSMCTL_DEB_OUT=DIR puts the .deb there.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
OUT=${KSMCTL_DEB_OUT:-$TOP/dist}
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/ksmctl-deb.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT INT TERM
SRC="$BUILD/ksmctl"
mkdir -p "$SRC" "$OUT"

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | (while IFS= read -r -d '' f 2>/dev/null; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done) \
        | tar --null -T - -cf - | tar -C "$SRC" -xf -
else
    tar --exclude=./.venv --exclude=./.venv39 --exclude=./build --exclude=./dist --exclude=./.git \
        -cf - . | tar -C "$SRC" -xf -
fi

if [ -n "${KSMCTL_DEB_VERSION:-}" ]; then
    { printf 'ksmctl (%s) unstable; urgency=medium\n\n  * Rebuild as %s.\n\n -- %s  %s\n\n' \
          "$KSMCTL_DEB_VERSION" "$KSMCTL_DEB_VERSION" \
          "$(sed -n 's/^Maintainer: //p' "$SRC/debian/control")" "$(date -R)"
      cat "$SRC/debian/changelog"; } > "$SRC/debian/changelog.new"
    mv "$SRC/debian/changelog.new" "$SRC/debian/changelog"
fi

dpkg-checkbuilddeps "$SRC/debian/control"
(cd "$SRC" && dpkg-buildpackage -us -uc -b)
for f in "$BUILD"/ksmctl_*.deb; do
    cp "$f" "$OUT/"
    echo "$OUT/$(basename "$f")"
done
