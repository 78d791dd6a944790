#!/usr/bin/env bash
# Build upstream Bacalhau from source at the version the CDK deploys (aws/bacalhau.py BACALHAU_VERSION),
# through the Go module proxy, and cache the binary on this machine. Prints the binary's path.
#
#   tests/network/build-bacalhau.sh            # ~/.cache/codsplat/bacalhau-<version> (CODSPLAT_CACHE moves it)
#
# The module zip is upstream's tagged source. Two things `go install ...@version` cannot do: its go.mod
# has `replace` lines (so it must be built inside the module), and its go.work names folders the module
# zip leaves out (so workspaces are off). The web UI is embedded from webui/build/, which the zip holds;
# an empty page is put there if it ever does not.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^BACALHAU_VERSION = "\(v[0-9.]*\)"$/\1/p' "$root/aws/bacalhau.py")
[ -n "$version" ] || { echo "no BACALHAU_VERSION in aws/bacalhau.py" >&2; exit 2; }
cache=${CODSPLAT_CACHE:-$HOME/.cache/codsplat}
binary=$cache/bacalhau-$version
if [ ! -x "$binary" ]; then
  mkdir -p "$cache"
  module=github.com/bacalhau-project/bacalhau@$version
  src=$(GOFLAGS=-mod=mod go mod download -json "$module" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "go mod download $module gave no source folder" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
  cp -r "$src/." "$work/" && chmod -R u+w "$work"
  [ -e "$work/webui/build/index.html" ] || { mkdir -p "$work/webui/build" && echo '<!doctype html>' > "$work/webui/build/index.html"; }
  echo "building Bacalhau $version from source (a few minutes, once per machine)" >&2
  (cd "$work" && GOWORK=off go build -trimpath \
     -ldflags "-s -w -X github.com/bacalhau-project/bacalhau/pkg/version.GITVERSION=$version" -o "$binary.part" .)
  mv "$binary.part" "$binary"
fi
echo "$binary"
