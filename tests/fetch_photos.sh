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
rm -rf "$dest.partial" && cp -r "$work/x/usr/share/backgrounds/mate" "$dest.partial" && mv "$dest.partial" "$dest"
echo "$dest"
