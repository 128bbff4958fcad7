#!/usr/bin/env bash
# Builds the Debian packages into target/debian/ and prints their paths, one a line:
#   vssd           the guest agent: vssd, vssctl, appvss, config, units, udev rules, man pages
#   libappvss-dev  the appvss C library: header, static library, pkg-config file
#   vmctl          the host tool
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
cat >"$gen/appvss.pc" <<PC
prefix=/usr
libdir=\${prefix}/lib/$tuple
includedir=\${prefix}/include

Name: appvss
Description: hold a vssd freeze from C (appvss.h)
Version: $version
Cflags: -I\${includedir}
# A static library of Rust code: it needs these system libraries too.
Libs: -L\${libdir} -lappvss -lpthread -ldl -lm -lrt
PC

debs=()
deb() {
  # cargo-deb prints the path of the package it made, last.
  local out
  out=$(cargo deb --no-build --locked "$@" | tail -1)
  [ -f "$out" ] || { echo "build-debs.sh: cargo deb $* made no package (it said: $out)" >&2; exit 1; }
  debs+=("$out")
}
deb -p vssd
deb -p appvss --multiarch=same
deb -p hostsim
echo "build-debs.sh: ${#debs[@]} packages in $((SECONDS - start)) s"
printf '%s\n' "${debs[@]}" >&3
