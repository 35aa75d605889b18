#!/usr/bin/env bash
# One-shot set-up on a fresh Debian 12 machine: system packages, the virtual environment, and
# Debian's BCC made visible inside it. Idempotent: each step is skipped when already done.
# `setup.sh --runtime` (the container image, deploy/docker/Dockerfile) installs only what the
# collector runs with: no test tools, databases or Go toolchains.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_PACKAGES=(python3-venv python3-bpfcc linux-headers-amd64 linux-libc-dev ca-certificates)
if [ "${1:-}" = "--runtime" ]; then
  MODE=runtime
  APT_PACKAGES=("${RUNTIME_PACKAGES[@]}")
else
  MODE=dev
  APT_PACKAGES=(
    "${RUNTIME_PACKAGES[@]}" bpfcc-tools bpftool systemd util-linux
    golang-1.19-go postgresql prometheus wrk curl git gcc libc6-dev
  )
fi

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages (${need_apt[*]}); run 'make setup' as root or install them with apt-get" >&2
    exit 1
  fi
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# BCC compiles against a kernel build tree. The running kernel ships none, so point the expected
# path at the installed Debian tree (uprobe programs read no kernel structs: a mismatch is safe).
# (Not in an image: the kernel it runs on is not known yet, and the receiver finds /usr/src/linux-headers-*.)
kver="$(uname -r)"
if [ "$MODE" = dev ] && [ "$(id -u)" -eq 0 ] && [ ! -e "/lib/modules/$kver/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$hdr" ]; then
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    common="${hdr%-amd64}-common"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
  fi
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$MODE-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  if [ "$MODE" = runtime ]; then
    .venv/bin/pip install -q --no-cache-dir -e .
  else
    .venv/bin/pip install -q -e '.[test]'
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Debian's BCC is a pure-Python package over libbcc.so: expose only it inside the venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/debian-bcc
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc .venv/debian-bcc/bcc
  echo "$PWD/.venv/debian-bcc" > "$site/debian-bcc.pth"
fi
echo "setup: ready (.venv)"
