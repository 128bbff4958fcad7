#!/usr/bin/env bash
# Builds the VM tier's guest from Debian's packages and this workspace, into a cache directory
# (default $CARGO_TARGET_DIR/guest, else <workspace>/target/guest; GUEST_DIR overrides):
#
#   vmlinuz          Debian's kernel (the package linux-image-amd64 depends on)
#   initrd.img       busybox-static initramfs: tests/guest/init as PID 1, the kernel modules it
#                    needs (dependency order), a static vssd, the plain writer (writer.rs,
#                    static), qemu-ga and sqlite3 with the shared libraries they need (ldd),
#                    the Hyper-V VSS emulation (hv-emu, hv-host: static) and Debian's stock
#                    hv_vss_daemon (package hyperv-daemons, unpacked, with its libraries),
#                    /sbin/shutdown (tests/guest/shutdown), and the files an installed system
#                    has: /etc/hostname (vmtest), /etc/os-release (this host's, Debian's),
#                    /etc/localtime (Europe/Berlin, from tzdata), /var/run -> /run
#   data.qcow2       the first data disk: p1 ext4 "db" (128 MiB), p2 xfs "logs" (320 MiB)
#   data2.qcow2      the second: p1 ext4 "e3", p2 ext4 "e4" (64 MiB each), p3 vfat "efi" (32 MiB)
#   guest.env        what was built (paths, kernel version), for scripts
#
# Kept as long as the inputs do not change: the kernel package, the disks' layout (DISKS_REV
# below) and, for the initramfs, the binaries and the files of this directory (it is repacked
# each run, in about a second, and replaced only when it differs).
#
# Options: --install  apt-get install what is missing first (needs root and Debian's lists).
# Env:     VSSD_GUEST_BIN  use this static vssd instead of building one with cargo.
#          SQLITE_WRITER_BIN  a static appvss sqlite_writer to include (else built if its
#                         example exists; skipped when it does not build).
# Prints the output directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ws=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$ws/target}
[[ $target = /* ]] || target=$ws/$target
out=${GUEST_DIR:-$target/guest}
DISKS_REV=3
TRIPLE=x86_64-unknown-linux-gnu

say() { echo "guest: $*" >&2; }
die() { echo "guest: error: $*" >&2; exit 1; }

if [ "${1:-}" = --install ]; then
  pkgs=(qemu-system-x86 qemu-utils busybox-static cpio kmod e2fsprogs xfsprogs dosfstools fdisk
        qemu-guest-agent sqlite3 tzdata)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # qemu-guest-agent's package starts a service: it must never freeze this host.
    systemctl stop qemu-guest-agent.service 2>/dev/null || true
  fi
fi

for tool in qemu-img cpio depmod modprobe mkfs.ext4 mkfs.xfs mkfs.vfat sfdisk rustc cargo dpkg apt-get; do
  command -v "$tool" >/dev/null || die "$tool is missing: run 'bash tests/guest/build.sh --install' as root (Debian 12)"
done
busybox=/bin/busybox
[ -x $busybox ] && ! ldd $busybox >/dev/null 2>&1 || die "a static busybox is missing: apt-get install busybox-static"
mkdir -p "$out/deb" "$out/work"

# ---------------------------------------------------------------------------------------
# The kernel: the version linux-image-amd64 depends on; the cached one when apt cannot tell.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true)
if [ -z "$kpkg" ] && [ ! -s "$out/kernel.pkg" ]; then
  say "apt does not know linux-image-amd64 yet: apt-get update"
  apt-get update -qq || true
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true)
fi
[ -n "$kpkg" ] || kpkg=$(cat "$out/kernel.pkg" 2>/dev/null || true)
[ -n "$kpkg" ] || die "cannot tell which Debian kernel to use (apt-cache depends linux-image-amd64 is empty)"
kver=${kpkg#linux-image-}
kroot=$out/kernel-root
if [ "$(cat "$out/kernel.pkg" 2>/dev/null)" != "$kpkg" ] || [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
  say "fetching $kpkg"
  rm -rf "$kroot" "$out/deb"/linux-image-*.deb
  (cd "$out/deb" && apt-get download "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed (apt-get update first?)"
  dpkg -x "$out"/deb/linux-image-*.deb "$kroot"
  depmod -b "$kroot" "$kver"
  cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
  echo "$kpkg" >"$out/kernel.pkg"
fi

# ---------------------------------------------------------------------------------------
# Static binaries, in ONE cargo run: vssd, appvss's CLI and sqlite_writer example, the tests
# crate's vsock-qga (a vsock client for the guest) and hv-emu. Built apart, cargo unifies their
# dependencies' features differently and every run rebuilds them. The extras are optional:
# when they do not build, vssd is built alone and the guest does without them.
static_build() {
  (cd "$ws" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target" \
     cargo build --release --quiet --target "$TRIPLE" "$@")
}
rel=$target/$TRIPLE/release
sqlite_writer=${SQLITE_WRITER_BIN:-}
extras=(-p tests --bin vsock-qga -p hv-emu --bin hv-emu --bin hv-host -p appvss --bin appvss)
[ -z "$sqlite_writer" ] && [ -f "$ws/appvss/examples/sqlite_writer.rs" ] && extras+=(--example sqlite_writer)
vsock_qga=
appvss_cli=
extras_ok=
if [ -n "${VSSD_GUEST_BIN:-}" ]; then
  vssd=$VSSD_GUEST_BIN
  static_build "${extras[@]}" 2>"$out/work/extras.err" && extras_ok=1
else
  say "building a static vssd and the guest's extras"
  vssd=$rel/vssd
  if static_build -p vssd --bin vssd "${extras[@]}" 2>"$out/work/extras.err"; then
    extras_ok=1
  else
    static_build -p vssd --bin vssd \
      || die "cargo could not build vssd (static) for the guest; fix the build, or set VSSD_GUEST_BIN to a static vssd"
  fi
fi
[ -x "$vssd" ] || die "no vssd binary at $vssd"
hv_emu=
if [ -n "$extras_ok" ]; then
  vsock_qga=$rel/vsock-qga
  hv_emu=$rel/hv-emu
  appvss_cli=$rel/appvss
  [ -z "$sqlite_writer" ] && [ -x "$rel/examples/sqlite_writer" ] && sqlite_writer=$rel/examples/sqlite_writer
else
  say "the guest's extras (sqlite_writer, vsock-qga, hv-emu, appvss) do not build (see $out/work/extras.err): the guest goes without them"
fi
[ -n "$sqlite_writer" ] || say "no appvss sqlite_writer: the guest uses the sqlite3 shell writer"

writer=$out/work/vm-writer
if [ ! -x "$writer" ] || [ "$here/writer.rs" -nt "$writer" ]; then
  say "building vm-writer"
  rustc --edition 2021 -O -C strip=symbols -C target-feature=+crt-static --target "$TRIPLE" "$here/writer.rs" -o "$writer"
fi

# ---------------------------------------------------------------------------------------
# The initramfs.
stage=$out/work/stage
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,data,lib/modules,lib64,var}
cp "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
ln -s ../run "$stage/var/run"
install -m 0755 "$here/init" "$stage/init"
# Before init's `busybox --install -s`, which leaves existing files alone.
install -m 0755 "$here/shutdown" "$stage/sbin/shutdown"
echo vmtest >"$stage/etc/hostname"
os_release=$(readlink -f /etc/os-release)
[ -f "$os_release" ] || die "this host has no /etc/os-release"
install -m 0644 "$os_release" "$stage/etc/os-release"
zone=Europe/Berlin
[ -f "/usr/share/zoneinfo/$zone" ] || die "/usr/share/zoneinfo/$zone is missing: apt-get install tzdata (or build.sh --install)"
install -m 0644 "/usr/share/zoneinfo/$zone" "$stage/etc/localtime"
echo "$zone" >"$stage/etc/timezone"
install -m 0755 "$vssd" "$stage/usr/bin/vssd"
install -m 0755 "$writer" "$stage/usr/bin/vm-writer"
[ -n "$sqlite_writer" ] && install -m 0755 "$sqlite_writer" "$stage/usr/bin/sqlite_writer"
[ -n "$vsock_qga" ] && install -m 0755 "$vsock_qga" "$stage/usr/bin/vsock-qga"
[ -n "$appvss_cli" ] && install -m 0755 "$appvss_cli" "$stage/usr/bin/appvss"
if [ -n "$hv_emu" ]; then
  install -m 0755 "$hv_emu" "$stage/usr/bin/hv-emu"
  install -m 0755 "$rel/hv-host" "$stage/usr/bin/hv-host"
fi

# Modules and everything they depend on, in the order modprobe would load them.
mods=(virtio_pci virtio_blk virtio_console virtio_rng ext4 xfs vfat nls_cp437 nls_ascii nls_utf8
      loop vsock vmw_vsock_virtio_transport vsock_loopback button evdev virtio_net cuse)
: >"$stage/etc/modules.list"
declare -A seen=()
for m in "${mods[@]}"; do
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    rel=${path#"$kroot/lib/modules/"}
    [ -n "${seen[$rel]:-}" ] && continue
    seen[$rel]=1
    mkdir -p "$stage/lib/modules/$(dirname "$rel")"
    cp "$path" "$stage/lib/modules/$rel"
    echo "$rel" >>"$stage/etc/modules.list"
  done < <(modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null || echo "missing $m")
done
grep -q virtio_blk "$stage/etc/modules.list" || die "the kernel modules were not found under $kroot"

# Dynamically linked programs with their libraries (as ldd resolves them on this machine,
# which is the same Debian release as the guest's kernel).
copy_with_libs() {
  local bin=$1 dest=$2
  install -D -m 0755 "$bin" "$stage$dest"
  ldd "$bin" | grep -o '/[^ )]*' | while read -r lib; do
    [ -e "$stage$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
  done
}
if [ -x /usr/sbin/qemu-ga ]; then copy_with_libs /usr/sbin/qemu-ga /usr/bin/qemu-ga
else say "qemu-ga not installed: guests with vmtest.agent=qemu-ga will have no agent"; fi
if [ -x /usr/bin/sqlite3 ]; then copy_with_libs /usr/bin/sqlite3 /usr/bin/sqlite3
else say "sqlite3 not installed: the guest has no SQLite writer"; fi
# Debian's hv_vss_daemon, unmodified (the same release as this host: ldd finds its libraries
# here). Downloaded, not installed: its unit must not run on this host.
hvroot=$out/hyperv-root
if [ ! -x "$hvroot/usr/sbin/hv_vss_daemon" ]; then
  say "fetching hyperv-daemons"
  rm -rf "$hvroot" "$out"/deb/hyperv-daemons_*.deb
  (cd "$out/deb" && apt-get download hyperv-daemons >/dev/null 2>&1) || say "apt-get download hyperv-daemons failed (apt-get update first?)"
  ls "$out"/deb/hyperv-daemons_*.deb >/dev/null 2>&1 && dpkg -x "$out"/deb/hyperv-daemons_*.deb "$hvroot"
fi
if [ -x "$hvroot/usr/sbin/hv_vss_daemon" ]; then
  copy_with_libs "$hvroot/usr/sbin/hv_vss_daemon" /usr/sbin/hv_vss_daemon
  ls "$out"/deb/hyperv-daemons_*.deb 2>/dev/null | sed 's|.*/||' >"$stage/etc/hyperv-daemons.deb"
else
  say "no hv_vss_daemon: the Hyper-V tests that need it will fail"
fi

# Fixed times: the same inputs give the same bytes, so an unchanged initramfs is not replaced.
find "$stage" -exec touch -h -d @0 {} +
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$out/work/initrd.new"
if cmp -s "$out/work/initrd.new" "$out/initrd.img"; then
  rm "$out/work/initrd.new"
else
  mv "$out/work/initrd.new" "$out/initrd.img"
  say "initramfs: $(du -h "$out/initrd.img" | cut -f1)"
fi

# ---------------------------------------------------------------------------------------
# Data disks: partitions made in a raw file with sfdisk, filesystems made in files of their
# own and placed at the partitions' offsets, then converted to qcow2 (sparse).
make_disk() {
  local name=$1; shift
  local raw=$out/work/$name.raw start=1 spec="" parts=()
  local total=1
  for p in "$@"; do
    IFS=: read -r fs label mib <<<"$p"
    total=$((total + mib))
  done
  total=$((total + 1))
  rm -f "$raw"; truncate -s "${total}M" "$raw"
  for p in "$@"; do
    IFS=: read -r fs label mib <<<"$p"
    local type=83
    [ "$fs" = vfat ] && type=c
    spec+="start=$((start * 2048)), size=$((mib * 2048)), type=$type"$'\n'
    parts+=("$fs:$label:$mib:$start")
    start=$((start + mib))
  done
  printf 'label: dos\n%s' "$spec" | sfdisk -q "$raw" >/dev/null
  for p in "${parts[@]}"; do
    IFS=: read -r fs label mib off <<<"$p"
    local img=$out/work/$name-$label.img
    rm -f "$img"; truncate -s "${mib}M" "$img"
    case $fs in
      ext4) mkfs.ext4 -q -F -L "$label" -E lazy_itable_init=0,lazy_journal_init=0 "$img" ;;
      xfs) mkfs.xfs -q -f -L "$label" "$img" ;;
      vfat) mkfs.vfat -n "$(echo "$label" | tr a-z A-Z)" "$img" >/dev/null ;;
    esac
    dd if="$img" of="$raw" bs=1M seek="$off" conv=notrunc,sparse status=none
    rm -f "$img"
  done
  qemu-img convert -f raw -O qcow2 "$raw" "$out/$name.qcow2"
  rm -f "$raw"
}
if [ "$(cat "$out/disks.rev" 2>/dev/null)" != "$DISKS_REV" ] || [ ! -f "$out/data.qcow2" ] || [ ! -f "$out/data2.qcow2" ]; then
  say "making the data disks"
  make_disk data ext4:db:128 xfs:logs:320
  make_disk data2 ext4:e3:64 ext4:e4:64 vfat:efi:32
  echo "$DISKS_REV" >"$out/disks.rev"
fi

cat >"$out/guest.env" <<EOF
GUEST_DIR=$out
KERNEL=$out/vmlinuz
INITRD=$out/initrd.img
KERNEL_PACKAGE=$kpkg
DISKS="$out/data.qcow2 $out/data2.qcow2"
SQLITE_WRITER=$([ -n "$sqlite_writer" ] && echo appvss || echo sqlite3-shell)
HV_EMU=$([ -n "$hv_emu" ] && echo yes || echo no)
HV_VSS_DAEMON=$([ -x "$hvroot/usr/sbin/hv_vss_daemon" ] && echo yes || echo no)
EOF
echo "$out"
