#!/usr/bin/env bash
# Make the machine ready for the image tests (`make test-image`): a Docker daemon, a local
# base image and an image holding the host's CA bundle. Each is made only when missing, so
# a second run costs a second.
#
# Machines here pull no image from a registry and may create no Docker network, so:
# * the daemon is Debian's docker.io, started with no default bridge (host networking only);
# * the base is built with debootstrap (Debian bookworm: python3 3.11, venv, CA certificates)
#   and `docker import`ed as $RELIABLE_IMAGE_BASE;
# * $RELIABLE_IMAGE_CA holds the host's CA bundle, which the Dockerfile's build stage trusts
#   when passed as --build-arg CA_IMAGE (a TLS-inspecting proxy sits between us and PyPI);
#   it is rebuilt when the host's bundle changes (a label holds the bundle's digest).
set -euo pipefail

BASE=${RELIABLE_IMAGE_BASE:-reliable-base:bookworm}
CA=${RELIABLE_IMAGE_CA:-reliable-host-ca:local}
BUNDLE=/etc/ssl/certs/ca-certificates.crt
DOCKERD_LOG=${RELIABLE_DOCKERD_LOG:-/var/log/reliable-dockerd.log}

say() { echo "prepare: $*"; }

if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || {
    echo "prepare: no dockerd: apt-get install docker.io (and debootstrap)" >&2
    exit 1
  }
  say "starting dockerd (no bridge, no iptables), log in $DOCKERD_LOG"
  setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  docker info >/dev/null 2>&1 || {
    echo "prepare: dockerd did not answer within 30 s; see $DOCKERD_LOG" >&2
    exit 1
  }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || {
    echo "prepare: no debootstrap: apt-get install debootstrap" >&2
    exit 1
  }
  root=$(mktemp -d "${TMPDIR:-/tmp}/reliable-base.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  say "building $BASE with debootstrap (about a minute)"
  start=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
  }
  # Trimmed as Debian's own images are: no apt lists, no docs.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/*
  tar -C "$root" -c . | docker import --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$root" "$root.log"
  trap - EXIT
  say "built $BASE in $(($(date +%s) - start)) s"
fi

digest=$(sha256sum "$BUNDLE" | cut -c1-64)
if [ "$(docker image inspect -f '{{index .Config.Labels "bundle"}}' "$CA" 2>/dev/null)" != "$digest" ]; then
  old=$(docker image inspect -f '{{.Id}}' "$CA" 2>/dev/null || true)
  tar -C / -ch "${BUNDLE#/}" | docker import --change "LABEL bundle=$digest" - "$CA" >/dev/null
  [ -n "$old" ] && docker rmi "$old" >/dev/null 2>&1 || true
  say "made $CA from $BUNDLE"
fi
say "dockerd up; base $BASE; CA image $CA"
