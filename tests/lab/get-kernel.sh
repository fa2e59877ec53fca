#!/bin/sh
# Fetch a guest kernel for the libvirt + QEMU test lab, without installing it on the host.
#
# Downloads the distribution's linux-image-6.1.*-amd64 package (the one linux-image-amd64
# depends on), unpacks only the kernel and the virtio modules the lab guests load (so the
# guest can report balloon statistics), and leaves them in $KSMCTL_LAB_CACHE
# (default /var/cache/ksmctl-lab). Idempotent: does nothing when the kernel is already there.
# Needs apt and root (or a writable cache dir); works from a clean clone.
set -eu

CACHE=${KSMCTL_LAB_CACHE:-/var/cache/ksmctl-lab}
if [ -s "$CACHE/vmlinuz" ] && [ -d "$CACHE/modules" ]; then
    echo "guest kernel already in $CACHE: $(cat "$CACHE/kernel-version" 2>/dev/null || echo unknown)"
    exit 0
fi
mkdir -p "$CACHE"

PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ ]*-amd64\)$/\1/p' | head -n1)
if [ -z "$PKG" ]; then
    # The metapackage's dependency is not in the apt lists yet: refresh them once.
    apt-get update -qq
    PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ ]*-amd64\)$/\1/p' | head -n1)
fi
if [ -z "$PKG" ]; then
    echo "get-kernel.sh: cannot find a linux-image-6.1.*-amd64 package (apt-cache depends linux-image-amd64)" >&2
    exit 1
fi

WORK=$(mktemp -d "$CACHE/.get-kernel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
# apt-get download writes to the current directory; _apt needs to be able to write there.
chmod 0777 "$WORK"
(cd "$WORK" && apt-get download -qq "$PKG")
DEB=$(ls "$WORK"/*.deb | head -n1)
dpkg -x "$DEB" "$WORK/root"

KVER=$(ls "$WORK/root/lib/modules" | head -n1)
MODS="$WORK/root/lib/modules/$KVER/kernel"
mkdir -p "$WORK/modules"
# Keep only what the guest needs for a virtio balloon (order matters for insmod).
for m in drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci \
         drivers/virtio/virtio_balloon; do
    for f in "$MODS/$m.ko" "$MODS/$m.ko.xz"; do
        [ -f "$f" ] && cp "$f" "$WORK/modules/"
    done
done
cp "$WORK/root/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
echo "$KVER" > "$WORK/kernel-version"

# Move into place last, so an interrupted run never leaves a half-filled cache.
rm -rf "$CACHE/modules"
mv "$WORK/modules" "$CACHE/modules"
mv "$WORK/kernel-version" "$CACHE/kernel-version"
mv "$WORK/vmlinuz" "$CACHE/vmlinuz"
echo "guest kernel $KVER in $CACHE"
