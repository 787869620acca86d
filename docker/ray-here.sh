#!/usr/bin/env bash
# compose's Ray profile where no compose tool and no `podman run` are at hand: the Ray image
# (built by `IMAGE=localhost/searchengine:cpu-ray EXTRAS=cpu,postgres,ray docker/build-here.sh`)
# run twice with buildah, on the host's network, as compose runs it:
#   - the head, with ray-head's entrypoint;
#   - the driver, with ray-driver's entrypoint and default command: it joins the head as a node,
#     then `searchengine index /photos --runner ray --ray-address auto`;
# then `stats` in the driver's data dir. Prints the index run's images/s.
# buildah's chroot isolation shares this machine's processes, so the end (`ray stop`) stops
# every Ray running here, not only these two containers': run it where nothing else uses Ray.
#
#   docker/ray-here.sh [PHOTO_FOLDER]           (root; podman, buildah)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/searchengine:cpu-ray}
PORT=${RAY_PORT:-6379}
work=$(mktemp -d /tmp/searchengine-ray.XXXXXX)
head=$(buildah from "$IMAGE")
driver=$(buildah from "$IMAGE")
cleanup() {
  buildah run --isolation=chroot --network=host "$head" -- ray stop --force >/dev/null 2>&1 || true
  [ -n "${head_pid:-}" ] && kill "$head_pid" 2>/dev/null || true
  buildah rm "$head" "$driver" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/photos" "$work/data"
src=${1:-$(bash tests/fetch_photos.sh | tail -1)}
find "$src" -maxdepth 2 -name '*.jpg' | sort | head -8 | xargs -I{} cp {} "$work/photos/"
chown -R 1000:1000 "$work/data"
n=$(ls "$work/photos" | wc -l)

# Tiny models in the driver's data dir, which both containers mount at the same path (the
# actors load the model the index records, by a directory every node has).
mounts=(-v "$work/photos:/photos:ro" -v "$work/data:/hostdata")
buildah run --isolation=chroot --network=host "${mounts[@]}" "$driver" -- searchengine make-tiny-model /hostdata/tiny-blip2 >/dev/null

# The head: ray-head's entrypoint (compose.yaml), in the background.
buildah run --isolation=chroot --network=host "${mounts[@]}" "$head" -- \
  ray start --head --block --port="$PORT" --num-cpus=2 --include-dashboard=false --disable-usage-stats \
  > "$work/head.log" 2>&1 &
head_pid=$!
up=
for _ in $(seq 60); do
  buildah run --isolation=chroot --network=host "$head" -- ray status --address="127.0.0.1:$PORT" >/dev/null 2>&1 && { up=1; break; }
  sleep 2
done
[ -n "$up" ] || { echo "the Ray head did not start:"; cat "$work/head.log"; exit 1; }

# The driver: ray-driver's entrypoint and default command, with the head at 127.0.0.1.
start=$(date +%s.%N)
buildah run --isolation=chroot --network=host "${mounts[@]}" \
  -e SEARCHENGINE_DATA_DIR=/hostdata -e HF_HUB_OFFLINE=1 "$driver" -- \
  sh -c "ray start --address=127.0.0.1:$PORT --num-cpus=0 --disable-usage-stats >/dev/null && exec searchengine \"\$@\"" searchengine \
  index /photos --runner ray --ray-address auto --model /hostdata/tiny-blip2 --no-captions
end=$(date +%s.%N)
buildah run --isolation=chroot --network=host -v "$work/data:/hostdata" -e SEARCHENGINE_DATA_DIR=/hostdata "$driver" -- searchengine stats | head -3
python3 -c "import sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(f'ray profile: {n} photos indexed in {s:.1f} s, {n / s:.2f} images/s (start-up of the node and the actors included)')" "$n" "$start" "$end"
