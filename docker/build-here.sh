#!/usr/bin/env bash
# Build the CPU image where no image registry is reachable, then smoke-test it:
# a Debian base from Debian packages (docker/base-from-debian.sh), torch from a local wheel
# (/opt/wheels, or TORCH_WHEEL=...), everything else from the package index; then, in a
# container, tiny models are made, a few photos indexed by `serve --watch`, and /healthz and
# a search answered.
#
#   docker/build-here.sh [PHOTO_FOLDER]          (root; podman and debootstrap installed)
set -euo pipefail
cd "$(dirname "$0")/.."
# IMAGE and EXTRAS pick the image: the default, or compose's Ray image
# (IMAGE=localhost/searchengine:cpu-ray EXTRAS=cpu,postgres,ray).
IMAGE=${IMAGE:-localhost/searchengine:cpu}
EXTRAS=${EXTRAS:-cpu,postgres}
podman image exists localhost/debian-python:bookworm || docker/base-from-debian.sh
WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl | head -1)}
podman build --isolation=chroot --network=host --format docker -f docker/Dockerfile -t "$IMAGE" \
  --build-arg BASE=localhost/debian-python:bookworm \
  --build-arg TORCH="--no-deps /wheels/$(basename "$WHEEL")" -v "$(dirname "$WHEEL")":/wheels:ro \
  --build-arg EXTRAS="$EXTRAS" \
  --build-arg PIP_CERT=/host-certs/ca-certificates.crt -v /etc/ssl/certs:/host-certs:ro .

# The smoke test runs in the image with buildah's chroot isolation, as the build does: here
# the OCI runtime may not set resource limits (crun: setrlimit not permitted), which stops
# `podman run`; where it works, `podman run` the image as docker/Dockerfile's header shows.
work=$(mktemp -d /tmp/searchengine-smoke.XXXXXX)
ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -p "$work/photos" "$work/data"
src=${1:-$(bash tests/fetch_photos.sh | tail -1)}
find "$src" -maxdepth 2 -name '*.jpg' | sort | head -5 | xargs -I{} cp {} "$work/photos/"
chown -R 1000:1000 "$work/data"
podman image inspect --format 'user {{.Config.User}}; healthcheck {{.Config.Healthcheck.Test}}' "$IMAGE"
# The data dir is a host folder owned by uid 1000, as `docker run -v ~/se-data:/data` gives
# one. buildah lets the image's own VOLUME /data shadow a bind mount at /data (the bind and
# its chown then do nothing), so the host folder goes to /hostdata and the data dir there;
# afterwards the index must be in the host folder, written by uid 1000.
buildah run --isolation=chroot --network=host -v "$work/data:/hostdata" -v "$work/photos:/photos:ro" \
  -e SEARCHENGINE_DATA_DIR=/hostdata -v "$PWD/docker/smoke.py:/smoke.py:ro" "$ctr" -- python3 /smoke.py
test -s "$work/data/store.db" || { echo "no store.db in the host's data folder"; exit 1; }
owner=$(stat -c %u "$work/data/store.db")
[ "$owner" = 1000 ] || { echo "store.db is owned by uid $owner, not 1000"; exit 1; }
echo "the index is in the host folder: $(du -sh "$work/data" | cut -f1), store.db owned by uid $owner"
