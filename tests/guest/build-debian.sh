#!/usr/bin/env bash
# Builds the VM tier's systemd guest: a Debian 12 root filesystem made with debootstrap from
# Debian's packages, booted with the kernel tests/guest/build.sh fetches, vssd's Debian package
# installed in it with dpkg -i (packaging/build-debs.sh; without it, the binaries, unit, udev
# rule and tmpfiles.d copied in as the package would install them). Into a cache directory
# (default $CARGO_TARGET_DIR/guest-debian, else <workspace>/target/guest-debian; GUEST_DEBIAN_DIR
# overrides):
#
#   base/            the debootstrap tree (kept while BASE_KEY's inputs do not change: this
#                    script's debootstrap section, the package list, suite and mirror)
#   base.key         the key base/ was made with
#   root.qcow2       the root disk: ext4 "vmroot" made from base/ + the test's files + vssd
#                    (mkfs.ext4 -d: no loop device, no mount); remade when its inputs change
#                    (root.key: this script, the package or binaries, the kernel)
#   initrd.img       a busybox initramfs that loads virtio_blk and ext4, mounts /dev/vda and
#                    switch_roots into systemd
#   vmlinuz          the kernel (a copy of build.sh's)
#   debian.env       what was built, and how long debootstrap took when it ran
#
# The data disks are build.sh's (data.qcow2, data2.qcow2: labels db, logs, e3, e4, efi); the
# guest's fstab mounts them under /data/LABEL.
#
# In the guest: vssd.service started by udev (packaging/60-vssd.rules) for the
# org.qemu.guest_agent.0 port; vmtest-shell.service: a root shell on the port org.vssd.shell.0
# (the protocol of TestVm::shell); journald keeps its journal in /run (Storage=volatile), so
# that nothing it does touches a frozen filesystem.
#
# Env:  VSSD_DEB       install this vssd package instead of building one.
#       VSSD_DEB_NEXT  the newer vssd package the upgrade test installs (default: built here,
#                      the next Debian revision of the same build; none with VSSD_DEB alone).
#       VSSD_GUEST_COPY=1  copy the binaries in instead of installing the package.
#       DEBIAN_MIRROR  the mirror debootstrap uses (default: the first deb.debian.org-style
#                      URI of this machine's apt sources, else http://deb.debian.org/debian).
# Prints the output directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ws=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$ws/target}
[[ $target = /* ]] || target=$ws/$target
out=${GUEST_DEBIAN_DIR:-$target/guest-debian}
TRIPLE=x86_64-unknown-linux-gnu
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,e2fsprogs,xfsprogs,dosfstools,sqlite3,procps

say() { echo "guest-debian: $*" >&2; }
die() { echo "guest-debian: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap chroots)"
for tool in debootstrap mkfs.ext4 qemu-img cpio modprobe depmod sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install debootstrap e2fsprogs qemu-utils cpio kmod (or tests/setup.sh)"
done

# The kernel, its modules, the data disks and a static vssd: build.sh's (cached there).
gdir=$(bash "$here/build.sh" --install | tail -n 1)
# shellcheck disable=SC1091
. "$gdir/guest.env"
kver=${KERNEL_PACKAGE#linux-image-}
kroot=$gdir/kernel-root
rel=$target/$TRIPLE/release
mkdir -p "$out/work"

# ---------------------------------------------------------------------------------------
# The mirror: the one this machine's apt uses for Debian (CI may reach nothing else).
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hoE '(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | awk '{print $2; exit}' || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi

# ---------------------------------------------------------------------------------------
# The debootstrap tree, keyed by its inputs.
base_key=$( { sed -n '/^# BASE-BEGIN/,/^# BASE-END/p' "$0"; echo "$SUITE $PACKAGES $mirror"; } | sha256sum | cut -c1-16)
# BASE-BEGIN (what this section does is part of base/'s key)
if [ "$(cat "$out/base.key" 2>/dev/null)" != "$base_key" ] || [ ! -x "$out/base/sbin/init" ]; then
  say "debootstrap $SUITE from $mirror (minbase + $PACKAGES)"
  rm -rf "$out/base" "$out/base.key"
  mkdir -p "$out/cache"
  t0=$(date +%s)
  if ! debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$out/cache" \
         "$SUITE" "$out/base" "$mirror" >"$out/work/debootstrap.log" 2>&1; then
    tail -n 20 "$out/work/debootstrap.log" >&2
    grep -q 'Failed getting release file\|Temporary failure\|Could not resolve\|Connection refused' "$out/work/debootstrap.log" &&
      die "debootstrap cannot reach its mirror $mirror (set DEBIAN_MIRROR to one this machine reaches)"
    die "debootstrap failed (log: $out/work/debootstrap.log)"
  fi
  # Downloaded packages stay in cache/ for the next rebuild; the tree needs none of them.
  rm -f "$out/base"/var/cache/apt/archives/*.deb
  echo "$(( $(date +%s) - t0 ))" >"$out/debootstrap.seconds"
  echo "$base_key" >"$out/base.key"
  say "debootstrap took $(cat "$out/debootstrap.seconds") s"
fi
# BASE-END

# ---------------------------------------------------------------------------------------
# vssd: the Debian package (packaging/build-debs.sh; VSSD_DEB overrides), installed with
# `dpkg -i` in the root tree. Without a package builder (or with VSSD_GUEST_COPY=1), as
# before: build.sh's static vssd, the workspace build's vssctl (run-all.sh's build step, the
# same cargo command, so nothing rebuilds; linked against this machine's glibc, which is
# Debian 12's like the guest's) and the unit, udev rule and tmpfiles.d copied from packaging/.
deb=${VSSD_DEB:-}
if [ -z "$deb" ] && [ -z "${VSSD_GUEST_COPY:-}" ] && [ -f "$ws/packaging/build-debs.sh" ]; then
  say "building the Debian packages (packaging/build-debs.sh)"
  deb=$(cd "$ws" && CARGO_TARGET_DIR="$target" bash packaging/build-debs.sh 2>"$out/work/build-debs.log" | grep '/vssd_[^/]*\.deb$' | head -n 1) \
    || { tail -n 30 "$out/work/build-debs.log" >&2; die "packaging/build-debs.sh failed (log: $out/work/build-debs.log)"; }
  [ -n "$deb" ] || { tail -n 30 "$out/work/build-debs.log" >&2; die "packaging/build-debs.sh printed no vssd_*.deb"; }
  [[ $deb = /* ]] || deb=$ws/$deb
fi
# The upgrade's package: a newer build of the same vssd (the next Debian revision), kept in the
# guest at /opt/vmtest/vssd-next.deb for vm_systemd's upgrade (dpkg -i while vssd runs) and
# reinstall after purge. VSSD_DEB_NEXT overrides; with VSSD_DEB and no VSSD_DEB_NEXT, none.
next=${VSSD_DEB_NEXT:-}
if [ -z "$next" ] && [ -z "${VSSD_DEB:-}" ] && [ -n "$deb" ]; then
  # cargo-deb deletes the other versions of a package it finds in target/debian: keep this one.
  cp "$deb" "$out/work/$(basename "$deb")"
  deb=$out/work/$(basename "$deb")
  rev=$(dpkg-deb -f "$deb" Version | sed -n 's/.*-\([0-9]*\)$/\1/p')
  say "building the upgrade's vssd package (revision $((rev + 1)))"
  next=$(cd "$ws" && CARGO_TARGET_DIR="$target" DEB_REVISION=$((rev + 1)) DEB_PACKAGES=vssd bash packaging/build-debs.sh \
           2>>"$out/work/build-debs.log" | grep '/vssd_[^/]*\.deb$' | head -n 1) \
    || { tail -n 30 "$out/work/build-debs.log" >&2; die "packaging/build-debs.sh (DEB_REVISION) failed"; }
  [[ $next = /* ]] || next=$ws/$next
fi
if [ -n "$deb" ]; then
  [ -f "$deb" ] || die "no package at $deb"
  say "vssd from the package $(basename "$deb")${next:+, upgrade to $(basename "$next")}"
  vssd_inputs=("$deb")
  [ -z "$next" ] || vssd_inputs+=("$next")
else
  (cd "$ws" && CARGO_TARGET_DIR="$target" cargo build --workspace --locked --bins --quiet) \
    || die "cargo could not build the workspace's binaries (vssctl for the guest)"
  vssd_bin=$rel/vssd
  vssctl_bin=$target/debug/vssctl
  [ -x "$vssd_bin" ] || die "no static vssd at $vssd_bin (tests/guest/build.sh builds it)"
  [ -x "$vssctl_bin" ] || die "no vssctl at $vssctl_bin"
  vssd_inputs=("$vssd_bin" "$vssctl_bin" "$ws"/packaging/vssd.service "$ws"/packaging/60-vssd.rules
               "$ws"/packaging/tmpfiles-vssd.conf "$ws"/packaging/vssd.toml)
fi

# ---------------------------------------------------------------------------------------
# The root disk and the initramfs, remade only when their inputs change: base/, this script,
# vssd, vssctl, the packaging files, the kernel.
root_key=$( { echo "$base_key $KERNEL_PACKAGE"; cat "$0" "${vssd_inputs[@]}" "$rel/examples/sqlite_writer" 2>/dev/null; } \
  | sha256sum | cut -c1-16)
if [ "$(cat "$out/root.key" 2>/dev/null)" = "$root_key" ] && [ -f "$out/root.qcow2" ] && [ -f "$out/initrd.img" ]; then
  say "root disk unchanged"
else
rm -f "$out/root.key"
# The root tree: base/ + the test's files, in a staging copy (base/ stays pristine).
stage=$out/work/root
rm -rf "$stage"
cp -a "$out/base" "$stage"
if [ -n "$deb" ]; then
  # As an admin installs it: dpkg -i (no systemd runs in the chroot, so nothing starts here).
  cp "$deb" "$stage/tmp/vssd.deb"
  chroot "$stage" dpkg -i /tmp/vssd.deb >"$out/work/dpkg.log" 2>&1 \
    || { cat "$out/work/dpkg.log" >&2; die "dpkg -i $(basename "$deb") failed in the guest's root"; }
  rm -f "$stage/tmp/vssd.deb"
  # The packages for the upgrade and the reinstall after purge (on the root disk: dpkg reads them).
  mkdir -p "$stage/opt/vmtest"
  cp "$deb" "$stage/opt/vmtest/vssd.deb"
  [ -z "$next" ] || cp "$next" "$stage/opt/vmtest/vssd-next.deb"
else
  install -m 0755 "$vssd_bin" "$stage/usr/sbin/vssd"
  install -m 0755 "$vssctl_bin" "$stage/usr/bin/vssctl"
  install -D -m 0644 "$ws/packaging/vssd.service" "$stage/lib/systemd/system/vssd.service"
  install -D -m 0644 "$ws/packaging/60-vssd.rules" "$stage/lib/udev/rules.d/60-vssd.rules"
  install -D -m 0644 "$ws/packaging/tmpfiles-vssd.conf" "$stage/usr/lib/tmpfiles.d/vssd.conf"
  [ -f "$ws/packaging/vssd.toml" ] && install -D -m 0644 "$ws/packaging/vssd.toml" "$stage/etc/vssd/vssd.toml"
fi

echo vmsys >"$stage/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmsys\n' >"$stage/etc/hosts"
# A fixed machine id: no first-boot setup (systemd-firstboot) under the test.
echo vmsys | md5sum | cut -c1-32 >"$stage/etc/machine-id"
# The group of vssd's application socket (app-socket-group in vssd.toml), as sysusers.d makes it.
grep -q '^vssd:' "$stage/etc/group" || groupadd -R "$stage" --system vssd
cat >"$stage/etc/fstab" <<'EOF'
LABEL=vmroot  /           ext4  defaults,errors=remount-ro  0 1
LABEL=db      /data/db    ext4  defaults,nofail             0 0
LABEL=logs    /data/logs  xfs   defaults,nofail             0 0
LABEL=e3      /data/e3    ext4  defaults,nofail             0 0
LABEL=e4      /data/e4    ext4  defaults,nofail             0 0
LABEL=EFI     /data/efi   vfat  defaults,nofail             0 0
EOF
mkdir -p "$stage"/data/{db,logs,e3,e4,efi}
# Root without a password on the serial console (a throwaway test guest).
sed -i 's/^root:[^:]*:/root::/' "$stage/etc/shadow"
mkdir -p "$stage/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$stage/etc/systemd/journald.conf.d/vmtest.conf"

# The test shell: a root shell on org.vssd.shell.0, restarted whenever the host disconnects.
cat >"$stage/usr/local/sbin/vmtest-shell" <<'EOF'
#!/bin/sh
# The port reads end-of-file while no host is connected: start a new shell until one is.
port=/dev/virtio-ports/org.vssd.shell.0
while [ ! -e $port ]; do sleep 0.2; done
exec 3<>$port
while :; do
  sh <&3 >&3 2>&3
  sleep 0.2
done
EOF
chmod 0755 "$stage/usr/local/sbin/vmtest-shell"
cat >"$stage/etc/systemd/system/vmtest-shell.service" <<'EOF'
[Unit]
Description=vssd tests: a root shell on the virtio-serial port org.vssd.shell.0
DefaultDependencies=no
Wants=dev-virtio\x2dports-org.vssd.shell.0.device
After=dev-virtio\x2dports-org.vssd.shell.0.device

[Service]
ExecStart=/usr/local/sbin/vmtest-shell
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
# udev starts it when the port appears (the way 60-vssd.rules starts vssd).
cat >"$stage/etc/udev/rules.d/70-vmtest-shell.rules" <<'EOF'
SUBSYSTEM=="virtio-ports", ATTR{name}=="org.vssd.shell.0", TAG+="systemd", ENV{SYSTEMD_WANTS}+="vmtest-shell.service"
EOF
mkdir -p "$stage/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/vmtest-shell.service "$stage/etc/systemd/system/multi-user.target.wants/vmtest-shell.service"
# Copied in: enabled as the unit's [Install] says. (The package enables what it enables.)
[ -n "$deb" ] || ln -sf /lib/systemd/system/vssd.service "$stage/etc/systemd/system/multi-user.target.wants/vssd.service"
# An application that holds vssd's freezes: appvss's SQLite writer (build.sh's static build of
# the example) as a systemd service on /data/db, as a user would run one.
sqlite_writer_bin=$rel/examples/sqlite_writer
if [ -x "$sqlite_writer_bin" ]; then
  install -m 0755 "$sqlite_writer_bin" "$stage/usr/bin/sqlite_writer"
  cat >"$stage/etc/systemd/system/vmtest-sqlite.service" <<'EOF'
[Unit]
Description=vssd tests: appvss's SQLite writer on /data/db, registered with vssd
RequiresMountsFor=/data/db
Wants=vssd.service
After=vssd.service

[Service]
ExecStart=/usr/bin/sqlite_writer /data/db/app.db --name sqlite --interval-ms 20
# Its acknowledgements ("ack N": record N is committed), in /run: never on a frozen filesystem.
StandardOutput=append:/run/vmtest-sqlite.acks
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
  ln -sf /etc/systemd/system/vmtest-sqlite.service "$stage/etc/systemd/system/multi-user.target.wants/vmtest-sqlite.service"
else
  say "no appvss sqlite_writer (build.sh could not build it): the guest has no application"
fi
# Nothing the test does not need (they only slow the boot under TCG).
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer systemd-timesyncd.service; do
  ln -sf /dev/null "$stage/etc/systemd/system/$u"
done

# The kernel's modules the guest needs, with their dependencies.
mods=(virtio_pci virtio_blk virtio_console virtio_rng virtio_net ext4 xfs vfat nls_cp437 nls_ascii
      nls_utf8 loop vsock vmw_vsock_virtio_transport vsock_loopback button evdev)
initmods=()
declare -A seen=()
for m in "${mods[@]}"; do
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    r=${path#"$kroot/lib/modules/$kver/"}
    [ -n "${seen[$r]:-}" ] && continue
    seen[$r]=1
    install -D -m 0644 "$path" "$stage/lib/modules/$kver/$r"
  done < <(modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null || echo "missing $m")
done
cp "$kroot/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$stage/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$stage" "$kver"

# The root disk: a raw ext4 image made from the tree, converted to qcow2 (sparse).
size_mib=$(( $(du -sm "$stage" | cut -f1) + 256 ))
rm -f "$out/work/root.raw"
mkfs.ext4 -q -F -L vmroot -d "$stage" -E lazy_itable_init=0,lazy_journal_init=0 "$out/work/root.raw" "${size_mib}M"
qemu-img convert -f raw -O qcow2 "$out/work/root.raw" "$out/root.qcow2.new"
mv "$out/root.qcow2.new" "$out/root.qcow2"
rm -rf "$out/work/root.raw" "$stage"

# ---------------------------------------------------------------------------------------
# The initramfs: busybox, virtio_pci + virtio_blk + ext4 and their dependencies, an init that
# mounts /dev/vda and hands over to systemd.
istage=$out/work/initrd
rm -rf "$istage"
mkdir -p "$istage"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$istage/bin/busybox"
ln -s busybox "$istage/bin/sh"
: >"$istage/modules.list"
declare -A iseen=()
for m in virtio_pci virtio_blk ext4; do
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    b=$(basename "$path")
    [ -n "${iseen[$b]:-}" ] && continue
    iseen[$b]=1
    cp "$path" "$istage/lib/modules/$b"
    echo "$b" >>"$istage/modules.list"
  done < <(modprobe -d "$kroot" -S "$kver" --show-depends "$m")
done
cat >"$istage/init" <<'EOF'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </modules.list
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; sleep 5; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
chmod 0755 "$istage/init"
find "$istage" -exec touch -h -d @0 {} +
(cd "$istage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$out/initrd.img"
rm -rf "$istage"
cp "$KERNEL" "$out/vmlinuz"
echo "$root_key" >"$out/root.key"
fi

cat >"$out/debian.env" <<EOF
GUEST_DEBIAN_DIR=$out
KERNEL=$out/vmlinuz
INITRD=$out/initrd.img
ROOT=$out/root.qcow2
DISKS="$DISKS"
KERNEL_PACKAGE=$KERNEL_PACKAGE
MIRROR=$mirror
DEBOOTSTRAP_SECONDS=$(cat "$out/debootstrap.seconds" 2>/dev/null || echo 0)
EOF
echo "$out"
