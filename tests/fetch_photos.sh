#!/usr/bin/env bash
# Fetch Debian's mate-backgrounds (about 30 large JPEG/PNG photos) into a cache folder and
# print that folder. Idempotent.
set -euo pipefail
dest="${SEARCHENGINE_TEST_PHOTOS:-${XDG_CACHE_HOME:-$HOME/.cache}/searchengine-tests/mate-backgrounds}"
if [ -n "$(find "$dest" -name '*.jpg' 2>/dev/null | head -n 1)" ]; then
  echo "$dest"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && { apt-get download mate-backgrounds >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get download mate-backgrounds >/dev/null 2>&1; }; })
dpkg -x "$work"/mate-backgrounds_*.deb "$work/x"
mkdir -p "$(dirname "$dest")"
# Copied beside the cache under a name of its own, then renamed into place in one step: two
# runs at once (the suite's workers) never copy into each other's folder, and the one that
# renames second finds the folder there and keeps it.
part=$(mktemp -d "$dest.partial.XXXXXX") && chmod 755 "$part"
cp -r "$work/x/usr/share/backgrounds/mate/." "$part/"
mv -T "$part" "$dest" 2>/dev/null || rm -rf "$part"
echo "$dest"
