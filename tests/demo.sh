#!/usr/bin/env bash
# The main job, until vmctl backs up whole VMs (issue 4): a consistent copy of live, busy
# filesystems. It makes ext4, xfs and btrfs loop filesystems with a writer on each, starts
# vssd scoped to them, freezes through vssctl, copies every image while frozen (what a
# hypervisor's snapshot does to a VM's disks), thaws, and checks every copy with its fsck.
# Needs root. Touches nothing but what it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (loop devices, mount, FIFREEZE): sudo $0" >&2; exit 2; }
bash tests/setup.sh
cargo build --release --locked -p vssd --bins 2>&1 | tail -1
bin=$PWD/target/release

d=$(mktemp -d /tmp/vssd-demo.XXXXXX)
scope=$d/mnt
vssd_pid=
writers=()
cleanup() {
  set +e
  for w in "${writers[@]}"; do kill "$w" 2>/dev/null; done
  [ -n "$vssd_pid" ] && kill "$vssd_pid" 2>/dev/null && wait "$vssd_pid" 2>/dev/null
  for m in "$scope"/*; do fsfreeze -u "$m" 2>/dev/null; done
  for m in "$scope"/* "$d/state"; do mountpoint -q "$m" && umount "$m"; done
  for img in "$d"/*.img; do
    for l in $(losetup -j "$img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
  done
  rm -rf "$d"
}
trap cleanup EXIT

echo "== making ext4, xfs and btrfs filesystems under $scope"
mkdir -p "$scope"/{ext4,xfs,btrfs} "$d/state" "$d/copies"
mount -t tmpfs -o size=1m vssd-demo-state "$d/state"     # /run/vssd is tmpfs on a real guest
truncate -s 128M "$d/ext4.img"; mkfs.ext4 -q -F "$d/ext4.img"
truncate -s 320M "$d/xfs.img";  mkfs.xfs -q -f "$d/xfs.img"
truncate -s 128M "$d/btrfs.img"; mkfs.btrfs -q -f "$d/btrfs.img" >/dev/null
for fs in ext4 xfs btrfs; do mount -o loop "$d/$fs.img" "$scope/$fs"; done

echo "== starting a writer on each: appends a numbered line and fsyncs it, over and over"
for fs in ext4 xfs btrfs; do
  ( i=0; while :; do i=$((i+1)); echo "record $i" >> "$scope/$fs/log"; sync "$scope/$fs/log" 2>/dev/null || sync; sleep 0.005; done ) &
  writers+=($!)
done
sleep 1

"$bin/vssd" --channel "unix:$d/vssd.sock" --scope "$scope" --state-dir "$d/state" --freeze-deadline 30 2>"$d/vssd.log" &
vssd_pid=$!
for _ in $(seq 50); do [ -S "$d/state/vssd.sock" ] && break; sleep 0.1; done
ctl() { "$bin/vssctl" --socket "$d/state/vssd.sock" "$@"; }

echo "== what vssd would freeze, and why"
ctl plan

echo "== freeze, copy every image while frozen, thaw"
t0=$(date +%s%N)
ctl freeze --deadline 30 | tail -1
t1=$(date +%s%N)
before=$(for fs in ext4 xfs btrfs; do wc -l < "$scope/$fs/log"; done | tr '\n' ' ')
for fs in ext4 xfs btrfs; do cp --sparse=always "$d/$fs.img" "$d/copies/$fs.img"; done
after=$(for fs in ext4 xfs btrfs; do wc -l < "$scope/$fs/log"; done | tr '\n' ' ')
t2=$(date +%s%N)
ctl thaw
t3=$(date +%s%N)
sleep 0.5
resumed=$(for fs in ext4 xfs btrfs; do wc -l < "$scope/$fs/log"; done | tr '\n' ' ')
ms() { echo $(( ($2 - $1) / 1000000 )); }

echo "== checking every copy"
ok=1
e2fsck -fn "$d/copies/ext4.img" >"$d/fsck-ext4" 2>&1 && echo "ext4 copy:  e2fsck -fn clean" || { ok=0; echo "ext4 copy:  e2fsck FAILED"; cat "$d/fsck-ext4"; }
# A frozen XFS keeps its log; replay it on the copy (mount + unmount) as recovery would, then check.
mkdir -p "$d/chk"
# (nouuid: the original, with the same UUID, is still mounted.)
mount -o loop,nouuid "$d/copies/xfs.img" "$d/chk" && umount "$d/chk"
xfs_repair -n "$d/copies/xfs.img" >"$d/fsck-xfs" 2>&1 && echo "xfs copy:   xfs_repair -n clean" || { ok=0; echo "xfs copy:   xfs_repair FAILED"; cat "$d/fsck-xfs"; }
btrfs check --readonly "$d/copies/btrfs.img" >"$d/fsck-btrfs" 2>&1 && echo "btrfs copy: btrfs check clean" || { ok=0; echo "btrfs copy: btrfs check FAILED"; cat "$d/fsck-btrfs"; }
for fs in ext4 xfs btrfs; do
  opts=loop,ro; [ $fs = xfs ] && opts=$opts,nouuid
  mount -o $opts "$d/copies/$fs.img" "$d/chk"
  last=$(tail -n 1 "$d/chk/log"); n=$(wc -l < "$d/chk/log")
  umount "$d/chk"
  echo "$fs copy:  $n records, the last one whole: \"$last\""
  [[ $last =~ ^record\ [0-9]+$ ]] || ok=0
done

echo
echo "== what this proved"
echo "- writers stalled while frozen: records before the copy $before, after it $after (equal = no write got through)"
echo "- and resumed after thaw: $resumed"
echo "- freeze took $(ms $t0 $t1) ms; the freeze window (freeze + copy + thaw, as the writers felt it) was $(ms $t0 $t3) ms"
echo "- every copy taken while frozen is a clean filesystem whose last record is whole"
[ "$before" = "$after" ] || ok=0
[ $ok = 1 ] && echo "demo: OK" || { echo "demo: FAILED (vssd log: $d/vssd.log)"; tail -20 "$d/vssd.log"; exit 1; }
