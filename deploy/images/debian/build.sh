#!/usr/bin/env bash
# Builds the default Debian workspace image locally: debootstrap, then
# `podman import`. No registry is involved. The tag carries a hash of this
# recipe, so a changed recipe builds a new image and an unchanged one is
# reused. Prints the image name on stdout; needs root (debootstrap).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/../../local/containers.conf}"
recipe="$(sha256sum "$here/build.sh" | cut -c1-12)"
image="localhost/k8shell-debian:$recipe"
# Blueprints name the stable alias; it follows the current recipe.
alias="localhost/k8shell-debian:bookworm"
if podman image exists "$image"; then
  podman tag "$image" "$alias" >&2
  echo "$image"
  exit 0
fi
suite="bookworm"
mirror="${K8SHELL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# openssh-client: ssh-add and git over SSH with a forwarded agent; rsync:
# `rsync -e ssh` from a laptop; python3: what most projects script with.
packages="bash,sudo,git,curl,ca-certificates,procps,locales,less,vim-tiny,openssh-client,rsync,python3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "k8shell: building $image (debootstrap $suite)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >&2
# A smaller image: package caches and lists are not needed at run time.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
echo "C.UTF-8 UTF-8" > "$work/root/etc/locale.gen"
tar -C "$work/root" -cf "$work/root.tar" .
podman import -q "$work/root.tar" "$image" >&2
podman tag "$image" "$alias" >&2
echo "$image"
