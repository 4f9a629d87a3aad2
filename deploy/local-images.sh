#!/usr/bin/env bash
# Base images made from Debian's packages, for a machine that reaches Debian's archive and PyPI
# but no container registry (docker.io's python, redis and nginx images are out of reach):
#
#   fusionrank-local/python:3.11-bookworm   python3 (3.11), venv, pip's CA bundle and pip.conf
#   fusionrank-local/redis:bookworm         Debian's redis-server and redis-cli
#   fusionrank-local/nginx:bookworm         Debian's nginx, logging to stdout/stderr, plus wget
#
# Each is `debootstrap --variant=minbase` into a folder, then `docker import`. An image that
# already exists is kept (FORCE=1 rebuilds). The project's Dockerfile takes the Python one as
# PYTHON_IMAGE; docker-compose.yml takes the other two as REDIS_IMAGE and NGINX_IMAGE.
# tests/deploy/test_compose_stack.py (make compose-test) calls this. Needs root and dockerd.
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CACHE=${CACHE:-/var/cache/fusionrank-debootstrap}
WORK=$(mktemp -d)
trap 'rm -rf "${WORK}"' EXIT
mkdir -p "${CACHE}"

# The CA bundle this machine's pip verifies with (pip config's `cert`, else Debian's default):
# a TLS-intercepting proxy's certificate is in it, and pip inside a build needs the same.
host_ca_bundle() {
  local cert
  cert=$(pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | tail -n1)
  echo "${cert:-/etc/ssl/certs/ca-certificates.crt}"
}

exists() { docker image inspect "$1" >/dev/null 2>&1; }

# make_image NAME PACKAGES [docker import -c CHANGE]...
make_image() {
  local name=$1 packages=$2
  shift 2
  if exists "${name}" && [ "${FORCE:-0}" != 1 ]; then
    echo "${name}: exists (FORCE=1 rebuilds)"
    return
  fi
  local root="${WORK}/${name//[\/:]/_}" started=${SECONDS}
  debootstrap --variant=minbase --cache-dir="${CACHE}" --include="${packages}" \
    "${SUITE}" "${root}" "${MIRROR}" >"${root}.log" 2>&1 \
    || { tail -n 30 "${root}.log" >&2; exit 1; }
  customise "${name}" "${root}"
  # Leave the package lists, caches and docs out of the image.
  rm -rf "${root}"/var/lib/apt/lists/* "${root}"/var/cache/apt/* "${root}"/usr/share/doc/* \
    "${root}"/usr/share/man/* "${root}"/usr/share/locale/*
  tar -C "${root}" --numeric-owner -c . | docker import \
    -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    -c "ENV LANG=C.UTF-8" "$@" - "${name}" >/dev/null
  echo "${name}: built in $((SECONDS - started)) s"
}

customise() {
  local name=$1 root=$2
  case "${name}" in
    *python*)
      cp "$(host_ca_bundle)" "${root}/etc/ssl/certs/ca-certificates.crt"
      printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"${root}/etc/pip.conf"
      ;;
    *nginx*)
      # The site Debian enables listens on :80; the image serves only what is mounted in
      # /etc/nginx/conf.d. Logs go to the container's output, as in the upstream image.
      rm -f "${root}/etc/nginx/sites-enabled/default"
      ln -sf /dev/stdout "${root}/var/log/nginx/access.log"
      ln -sf /dev/stderr "${root}/var/log/nginx/error.log"
      ;;
  esac
}

make_image fusionrank-local/python:3.11-bookworm \
  python3,python3-venv,python-is-python3,ca-certificates,passwd \
  -c 'CMD ["python3"]'
make_image fusionrank-local/redis:bookworm redis-server \
  -c 'EXPOSE 6379' -c 'CMD ["redis-server", "--protected-mode", "no"]'
make_image fusionrank-local/nginx:bookworm nginx,wget \
  -c 'EXPOSE 80' -c 'CMD ["nginx", "-g", "daemon off;"]'
