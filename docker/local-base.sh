#!/usr/bin/env bash
# A stand-in for python:3.11-slim made from Debian packages, for builders that cannot pull from
# Docker Hub (air-gapped or mirror-only networks): Debian bookworm (minbase) with Python 3.11 and
# venv, imported into the local Docker engine. Then build with --build-arg BASE_IMAGE=<tag>.
#
#   sudo docker/local-base.sh [--tag hmgdm-base:bookworm-py311] [--mirror URL] [--ca-cert FILE]...
#
# --ca-cert adds a CA the base trusts (e.g. a hospital's TLS-inspecting proxy) and points pip at
# the system bundle, so `pip install` inside builds verifies through that proxy. Needs root,
# debootstrap and a reachable Debian mirror (apt-get install debootstrap).
set -euo pipefail

tag=hmgdm-base:bookworm-py311
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
ca_certs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        --security-mirror) security=$2; shift 2 ;;
        --ca-cert) ca_certs+=("$2"); shift 2 ;;
        *) echo "usage: $0 [--tag T] [--mirror URL] [--security-mirror URL] [--ca-cert FILE]..." >&2
           exit 2 ;;
    esac
done
for ca in "${ca_certs[@]}"; do
    [ -r "$ca" ] || { echo "error: --ca-cert $ca: not a readable file" >&2; exit 2; }
done

rootfs=$(mktemp -d /tmp/hmgdm-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock out non-root users

debootstrap --variant=minbase bookworm "$rootfs" "$mirror" || {
    tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    exit 1
}
# Security updates too: python:3.11-slim tracks the latest 3.11 patch release.
cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
mkdir -p "$rootfs/usr/local/share/ca-certificates"
for ca in "${ca_certs[@]}"; do
    cp "$ca" "$rootfs/usr/local/share/ca-certificates/$(basename "${ca%.*}").crt"
done
# apt resolves what debootstrap's --include does not (python3.11-venv needs python3.11-distutils).
chroot "$rootfs" sh -c 'apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*'

changes=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
if [ ${#ca_certs[@]} -gt 0 ]; then
    changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt')
fi
tar -C "$rootfs" --numeric-owner -c . | docker import "${changes[@]}" - "$tag"
docker run --rm "$tag" python3 -c 'import sys, venv, ssl; print(sys.version.split()[0], ssl.OPENSSL_VERSION)'
echo "base image: $tag (build with --build-arg BASE_IMAGE=$tag)"
