#!/bin/bash
# The project's one install, shared by both variants of the image (container/Dockerfile):
#   install.sh dependencies   what pyproject.toml declares, into the active venv (a layer that changes
#                             only with pyproject.toml, so a code change re-installs nothing heavy)
#   install.sh project        the project itself, from /src (a built wheel: what the host installs too)
set -euo pipefail
case "${1:-}" in
  dependencies)
    python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt
    pip install --requirement /tmp/requirements.txt
    rm /tmp/requirements.txt ;;
  project)
    pip install --no-deps /src ;;
  *)
    echo "usage: install.sh dependencies|project" >&2
    exit 2 ;;
esac
