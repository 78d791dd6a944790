#!/usr/bin/env bash
# The CPU worker image, built for real from container/Dockerfile (target `cpu`) and pushed to a local
# registry, so that it carries a digest: Bacalhau's bid-time check accepts a local image only if it
# has one (pkg/docker/docker.go ImageDistribution). Prints the image by digest.
#
#   tests/network/build-worker-image.sh 127.0.0.1:5000
#
# No image can be pulled here, so the base is made from Debian's packages: debootstrap (minbase, as
# debian:bookworm-slim is), with this machine's extra CA certificates and a pip.conf that trusts the
# system bundle, since pip's own bundle knows no site CA. It is made once per machine; Docker's layer
# cache keeps every later build to the layers the change touched.
set -euo pipefail
registry=${1:?usage: build-worker-image.sh REGISTRY_HOST:PORT}
root=$(cd "$(dirname "$0")/../.." && pwd)
base=codsplat-base:bookworm
cache=${CODSPLAT_CACHE:-$HOME/.cache/codsplat}

if ! docker image inspect "$base" >/dev/null 2>&1; then
  rootfs=$cache/rootfs-bookworm
  rm -rf "$rootfs"
  echo "making $base with debootstrap (once per machine)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >&2
  install -d "$rootfs/usr/local/share/ca-certificates"
  if [ -d /usr/local/share/ca-certificates ]; then  # a site's own CAs (a TLS proxy in front of PyPI)
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \;
  fi
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$base" >&2
  rm -rf "$rootfs"
fi

image=$registry/codsplat-worker:cpu
docker build --quiet -f "$root/container/Dockerfile" --target cpu --build-arg CPU_BASE="$base" -t "$image" "$root" >&2
docker push --quiet "$image" >&2
docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" | grep -m1 "^$registry/"
