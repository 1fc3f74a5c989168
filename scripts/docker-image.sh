#!/usr/bin/env bash
# Builds the agentmesh runtime image without any registry: the host's release binary and the
# shared libraries it links (as ldd lists them) in a FROM scratch image, with the same user,
# volume, ports, health check and entry point as docker/Dockerfile, tagged as the compose file
# expects. Machines that can pull base images may use docker/Dockerfile instead.
#
#   scripts/docker-image.sh                 # builds target/release/agentmesh, tags agentmesh:dev
#   AGENTMESH_IMAGE=agentmesh:test scripts/docker-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

image=${AGENTMESH_IMAGE:-agentmesh:dev}
bin=target/release/agentmesh

command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }
cargo build --release --locked -p agentmesh

ctx=$(mktemp -d -t agentmesh-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$ctx/data"
chmod 1777 "$root/tmp"
chmod 0700 "$ctx/data"
install -m 0755 "$bin" "$root/usr/local/bin/agentmesh"
# Release builds keep debug info for profiling; the image does not need it.
if command -v strip >/dev/null; then
  strip --strip-debug "$root/usr/local/bin/agentmesh"
fi

# Every shared library the binary links, and the dynamic loader, at the same paths.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "ldd found no libraries for $bin" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
agentmesh:x:10001:10001:agentmesh:/var/lib/agentmesh:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
agentmesh:x:10001:
GROUP

cp docker/Dockerfile.host "$ctx/Dockerfile"
docker build --quiet --tag "$image" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "built $image ($((size / 1024 / 1024)) MiB): $(docker run --rm --entrypoint agentmesh "$image" --version)"
