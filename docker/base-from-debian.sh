#!/usr/bin/env bash
# Build a Debian base image from Debian packages alone (debootstrap + podman import), for
# machines that reach a package mirror but no image registry. The Dockerfiles' default base
# stays the usual public image; pass this one with --build-arg BASE=localhost/debian-python:bookworm.
#
#   docker/base-from-debian.sh [MIRROR]       (needs root, debootstrap and podman)
set -euo pipefail
MIRROR=${1:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /tmp/debian-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl bookworm "$ROOT" "$MIRROR"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/debian-python:bookworm
echo "built localhost/debian-python:bookworm"
