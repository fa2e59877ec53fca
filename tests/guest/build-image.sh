#!/bin/sh
# Build (once, cached) a Debian 12 disk image whose init is systemd, for the package tests
# in tests/test_deb_guest.py: Debian packages only (mmdebstrap), turned into an ext4 image
# with `mkfs.ext4 -d` (no loop mount), kernel and initramfs taken from the image itself.
#
# The cache directory is keyed on everything that shapes the image (this script, the agent
# and its unit, the package list, the mmdebstrap version), so a change rebuilds it:
#   $KSMCTL_LAB_CACHE/systemd-guest-<key>/{disk.img,vmlinuz,initrd.img,packages.txt}
# Prints that directory on the last line of stdout. Needs root, mmdebstrap, e2fsprogs and
# Debian's archive (the guest itself never has a network).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${KSMCTL_LAB_CACHE:-/var/cache/ksmctl-lab}
SUITE=bookworm
MIRROR=${KSMCTL_GUEST_MIRROR:-http://deb.debian.org/debian}
# Everything the guest runs, installed now: it has no network at test time.
#  systemd, udev, dbus    the init under test, its device manager, systemctl/analyze's bus
#  linux-image-amd64      the guest's own kernel (KSM built in) and its initramfs
#  python3, python3-yaml, python3-libvirt   what the ksmctl package depends on / recommends
#  ksmtuned               the Debian package ksmctl replaces (coexistence scenario)
#  procps, passwd         pgrep/ps; useradd for the unprivileged-user scenario
PACKAGES="systemd systemd-sysv udev dbus linux-image-amd64 initramfs-tools zstd kmod
  python3 python3-yaml python3-libvirt ksmtuned procps passwd"

mkdir -p "$CACHE"
KEY=$( { cat "$0" "$HERE/agent.py" "$HERE/ksmlab-agent.service"; echo "$PACKAGES $SUITE $MIRROR"; \
         mmdebstrap --version; } | sha256sum | cut -c1-16)
OUT="$CACHE/systemd-guest-$KEY"
if [ -s "$OUT/disk.img" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
    echo "$OUT"
    exit 0
fi

WORK=$(mktemp -d "$CACHE/.build-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
ROOT="$WORK/root"

# A small initramfs (the modules to mount a virtio ext4 root, not MODULES=most): it is
# unpacked under software emulation at every boot.
mmdebstrap --variant=apt --include="$(echo $PACKAGES | tr ' ' ',')" \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/ksmlab" && printf "virtio_pci\nvirtio_blk\next4\n" > "$1/etc/initramfs-tools/modules"' \
    --customize-hook="cp '$HERE/agent.py' \"\$1/usr/local/sbin/ksmlab-agent\" && chmod 0755 \"\$1/usr/local/sbin/ksmlab-agent\"" \
    --customize-hook="cp '$HERE/ksmlab-agent.service' \"\$1/etc/systemd/system/ksmlab-agent.service\"" \
    --customize-hook='chroot "$1" systemctl enable ksmlab-agent.service' \
    --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer getty@tty1.service serial-getty@ttyS0.service systemd-timesyncd.service 2>/dev/null || true' \
    --customize-hook='echo ksmlab > "$1/etc/hostname"; printf "/dev/vda / ext4 rw,noatime 0 1\n" > "$1/etc/fstab"' \
    --customize-hook='od -An -N16 -tx1 /dev/urandom | tr -d " \n" > "$1/etc/machine-id"; echo >> "$1/etc/machine-id"' \
    --customize-hook='mkdir -p "$1/etc/systemd/journald.conf.d" && printf "[Journal]\nStorage=volatile\nForwardToConsole=no\n" > "$1/etc/systemd/journald.conf.d/ksmlab.conf"' \
    --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > "$1/root/packages.txt"' \
    "$SUITE" "$ROOT" "$MIRROR"

cp "$ROOT"/boot/vmlinuz-* "$WORK/vmlinuz"
cp "$ROOT"/boot/initrd.img-* "$WORK/initrd.img"
cp "$ROOT/root/packages.txt" "$WORK/packages.txt"
# Room for the package and its upgrade; sparse, so it costs only what is written.
mkfs.ext4 -q -F -L ksmlab -d "$ROOT" "$WORK/disk.img" 3G

mkdir -p "$OUT.tmp"
mv "$WORK/disk.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/packages.txt" "$OUT.tmp/"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
