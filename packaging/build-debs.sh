#!/usr/bin/env bash
# Builds the Debian packages into target/debian/ and prints their paths, one a line:
#   vssd           the guest agent: vssd, vssctl, appvss, config, units, udev rules, man pages
#   libappvss0     the appvss C library, shared (libappvss.so.0), with its shlibs and ldconfig trigger
#   libappvss-dev  for C programs: header, libappvss.so (-> .so.0), static libappvss.a, pkg-config
#                  files appvss.pc (shared) and appvss-static.pc
#   vmctl          the host tool
# Env: DEB_REVISION (default 1) the Debian revision of every package (a newer build of the same
#      sources, e.g. for an upgrade test: DEB_REVISION=2); DEB_PACKAGES (default all four) the
#      names of the packages to make, space-separated.
# Needs cargo-deb (tests/setup.sh installs it). The release build is the one run-all.sh's
# benchmarks make (the same cargo invocations), so CI compiles it once. The man pages (from the
# clap definitions, and vssd.toml(5) from the commented packaging/vssd.toml), the pkg-config file
# and, until the D-Bus branch provides packaging/dbus/org.vssd.Agent.conf, a placeholder policy
# are generated under target/packaging/ first. Logs go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "build-debs.sh: cargo-deb not found: cargo install cargo-deb --locked (tests/setup.sh does)" >&2; exit 2; }

# Everything but the .deb paths goes to stderr.
exec 3>&1 1>&2

# One build at a time per tree: test binaries that need the packages (packages.rs, the systemd
# guests) may call this at the same time, and each one empties target/packaging/ first.
mkdir -p target
exec 9>target/.build-debs.lock
flock 9

start=$SECONDS
# The benchmarks' builds (tests/run-all.sh), then the C library and the appvss CLI.
cargo build --release --locked -p vssd -p tests --bins
cargo build --release --locked -p hostsim -p tests --bins
cargo build --release --locked -p appvss --bins --lib
rel=$(cargo metadata --format-version 1 --no-deps --locked | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
echo "build-debs.sh: release build done in $((SECONDS - start)) s"

gen=target/packaging
rm -rf "$gen"
mkdir -p "$gen/man"
"$rel/vssd" --man >"$gen/man/vssd.8"
"$rel/vssctl" man >"$gen/man/vssctl.8"
"$rel/appvss" man >"$gen/man/appvss.1"
"$rel/vmctl" man >"$gen/man/vmctl.1"
awk -v version="$version" -f packaging/vssd.toml.5.awk packaging/vssd.toml >"$gen/man/vssd.toml.5"

if [ -f packaging/dbus/org.vssd.Agent.conf ]; then
  cp packaging/dbus/org.vssd.Agent.conf "$gen/org.vssd.Agent.conf"
else
  echo "build-debs.sh: no packaging/dbus/org.vssd.Agent.conf yet: packaging a placeholder policy (root only)"
  cat >"$gen/org.vssd.Agent.conf" <<'POLICY'
<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Placeholder until vssd's D-Bus interface lands: only root may own or call org.vssd.Agent. -->
<busconfig>
  <policy user="root">
    <allow own="org.vssd.Agent"/>
    <allow send_destination="org.vssd.Agent"/>
  </policy>
</busconfig>
POLICY
fi

# The library's directory, as cargo-deb's --multiarch=same names it.
tuple=${DEB_HOST_MULTIARCH:-$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")}
# appvss.pc links the shared library (libappvss.so -> libappvss.so.0, from libappvss0);
# appvss-static.pc the static one, which, being Rust code, needs these system libraries too.
for variant in shared static; do
  if [ $variant = shared ]; then pc=appvss.pc libs='-lappvss' desc=''
  else pc=appvss-static.pc libs='-l:libappvss.a -lpthread -ldl -lm -lrt' desc=', linked statically'; fi
  cat >"$gen/$pc" <<PC
prefix=/usr
libdir=\${prefix}/lib/$tuple
includedir=\${prefix}/include

Name: ${pc%.pc}
Description: hold a vssd freeze from C (appvss.h)$desc
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} $libs
PC
done

revision=${DEB_REVISION:-1}
want=" ${DEB_PACKAGES:-vssd libappvss0 libappvss-dev vmctl} "
wanted() { [[ $want = *" $1 "* ]]; }
debs=()
# Another revision goes to a directory of its own. (cargo-deb also deletes the other versions
# of the package from target/debian/: copy a build away first to keep it.)
outdir=()
[ "$revision" = 1 ] || outdir=(--output "$(dirname "$rel")/debian/r$revision/")
deb() {
  # cargo-deb prints the path of the package it made, last.
  local out
  out=$(cargo deb --no-build --locked --deb-revision "$revision" "${outdir[@]}" "$@" | tail -1)
  [ -f "$out" ] || { echo "build-debs.sh: cargo deb $* made no package (it said: $out)" >&2; exit 1; }
  debs+=("$out")
}
wanted vssd && deb -p vssd
wanted vmctl && deb -p hostsim

# The shared library and the -dev package. libappvss0 is made here with dpkg-deb, because
# cargo-deb writes no shlibs file nor ldconfig trigger (Debian policy 8.6; lintian's
# no-shlibs and lacks-ldconfig-trigger); libappvss-dev is cargo-deb's, with the development
# symlink libappvss.so and its exact Depends on libappvss0 added.
if wanted libappvss0 || wanted libappvss-dev; then
  arch=$(dpkg --print-architecture)
  debver=$version-$revision
  soname=$(readelf -d "$rel/libappvss.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  [ "$soname" = libappvss.so.0 ] || { echo "build-debs.sh: $rel/libappvss.so has SONAME '$soname', not libappvss.so.0 (appvss/build.rs sets it)" >&2; exit 1; }
  work=$gen/dpkg
  rm -rf "$work" && mkdir -p "$work"
  # cargo-deb's -dev package, unpacked: it gives the copyright and changelog for libappvss0 too.
  dev=$(cargo deb --no-build --locked --deb-revision "$revision" "${outdir[@]}" -p appvss --multiarch=same | tail -1)
  [ -f "$dev" ] || { echo "build-debs.sh: cargo deb -p appvss made no package (it said: $dev)" >&2; exit 1; }
  dpkg-deb -R "$dev" "$work/dev"

  lib=$work/lib
  mkdir -p "$lib/DEBIAN" "$lib/usr/lib/$tuple" "$lib/usr/share/doc/libappvss0"
  install -m 0644 "$rel/libappvss.so" "$lib/usr/lib/$tuple/libappvss.so.0"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$lib/usr/lib/$tuple/libappvss.so.0"
  cp "$work/dev/usr/share/doc/libappvss-dev/copyright" "$work/dev/usr/share/doc/libappvss-dev/changelog.Debian.gz" \
     "$lib/usr/share/doc/libappvss0/"
  chmod 0644 "$lib/usr/share/doc/libappvss0/"*
  # Its dependencies, as dpkg-shlibdeps finds them (it wants a debian/control to read).
  mkdir -p "$work/shlibdeps/debian"
  printf 'Source: appvss\n\nPackage: libappvss0\nArchitecture: any\n' >"$work/shlibdeps/debian/control"
  so=$(realpath "$lib/usr/lib/$tuple/libappvss.so.0")
  depends=$(cd "$work/shlibdeps" && dpkg-shlibdeps -O -e "$so" | sed -n 's/^shlibs:Depends=//p')
  [ -n "$depends" ] || { echo "build-debs.sh: dpkg-shlibdeps found no dependencies for libappvss.so.0" >&2; exit 1; }
  echo "libappvss 0 libappvss0 (>= $version)" >"$lib/DEBIAN/shlibs"
  echo "activate-noawait ldconfig" >"$lib/DEBIAN/triggers"
  cat >"$lib/DEBIAN/control" <<CONTROL
Package: libappvss0
Version: $debver
Architecture: $arch
Multi-Arch: same
Maintainer: $(sed -n 's/^Maintainer: //p' "$work/dev/DEBIAN/control")
Installed-Size: $(du -sk "$lib/usr" | cut -f1)
Depends: $depends
Section: libs
Priority: optional
Description: hold a vssd freeze from C: shared library
 appvss lets an application take part in a vssd freeze: it is asked to
 prepare, flushes and holds its writes while the VM's disks are snapshotted,
 and resumes at the thaw. This package has the shared library
 libappvss.so.0; libappvss-dev has the header and the files to build with it.
CONTROL
  (cd "$lib" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum >DEBIAN/md5sums)
  chmod 0644 "$lib/DEBIAN/"*
  libdeb=$(dirname "$dev")/libappvss0_${debver}_$arch.deb
  dpkg-deb --root-owner-group -Zxz --build "$lib" "$libdeb" >/dev/null
  wanted libappvss0 && debs+=("$libdeb")

  # The -dev package: the symlink that -lappvss finds, and the library it points to.
  ln -sf libappvss.so.0 "$work/dev/usr/lib/$tuple/libappvss.so"
  sed -i "s/^Depends: .*/Depends: libappvss0 (= $debver), libc6-dev/" "$work/dev/DEBIAN/control"
  dpkg-deb --root-owner-group -Zxz --build "$work/dev" "$dev" >/dev/null
  wanted libappvss-dev && debs+=("$dev")
  rm -rf "$work"
fi
echo "build-debs.sh: ${#debs[@]} packages in $((SECONDS - start)) s"
printf '%s\n' "${debs[@]}" >&3
