# shellcheck shell=bash
# Installs what k8shell needs and is missing. Idempotent: a second run only
# checks. Sourced by scripts/up and scripts/test.

# Debian packages the platform and its tests use.
K8SHELL_APT_PACKAGES=(
  nats-server      # event bus (a private server is started per platform/test)
  postgresql       # projections (a private cluster is started per platform/test)
  podman runc      # local workspace runtime
  catatonit        # init of podman pods' infra container (kube play)
  openssh-client   # SSH end-to-end tests (ssh, scp, sftp, ssh-agent, ssh-keygen)
  rsync            # `rsync -e ssh` through the SSH proxy, in the same tests
  python3          # the SSH tests' stand-in load balancer (PROXY protocol)
  busybox-static   # a workspace image without libc, for k8shelld end-to-end tests
  debootstrap      # builds the Debian workspace image locally
  procps           # top, for the terminal reattach test
  curl ca-certificates pkg-config

)

k8shell_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

k8shell_install_apt() {
  local missing=()
  for pkg in "${K8SHELL_APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "k8shell: installing ${missing[*]}"
    k8shell_as_root apt-get update -qq
    # policy-rc.d-free machines may try to start the packaged services; ours
    # are private per platform, so a failure to start those is harmless.
    DEBIAN_FRONTEND=noninteractive k8shell_as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

k8shell_check_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "k8shell: a Rust toolchain (1.95 or newer) is needed: https://rustup.rs" >&2
      exit 1
    fi
  fi
}

k8shell_install_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "k8shell: installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
}

# Podman settings are project-owned (runc runtime, no default ulimits), not
# written to /etc.
k8shell_podman_env() {
  export CONTAINERS_CONF="$K8SHELL_ROOT/deploy/local/containers.conf"
}

# The default Debian workspace image (cached; rebuilt when its recipe
# changes). Prints the image name.
k8shell_workspace_image() {
  k8shell_as_root env CONTAINERS_CONF="$CONTAINERS_CONF" "$K8SHELL_ROOT/deploy/images/debian/build.sh"
}

k8shell_deps() {

  k8shell_install_apt
  k8shell_check_rust
  k8shell_podman_env
}

# The test suite's OpenID Provider (npm `oidc-provider`, pinned by
# tests/oidc-provider/package-lock.json). Node.js comes from Debian when the
# machine has none; an existing node is kept when it is new enough.
# oidc-provider 9 and its `jose` need Node.js >= 20 (global WebCrypto), and
# Debian bookworm ships 18: then Debian's node only runs npm, which fetches
# a Node.js 22 binary from the npm registry (`node-linux-<arch>`) into the
# cache, put first on PATH for the tests.
K8SHELL_NODE_MIN_MAJOR="${K8SHELL_NODE_MIN_MAJOR:-20}"
K8SHELL_NODE_VERSION="22.23.3"
k8shell_test_node_deps() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "k8shell: installing nodejs npm"
    k8shell_as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive k8shell_as_root apt-get install -y -qq --no-install-recommends nodejs npm
  fi
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  if [ "$major" -lt "$K8SHELL_NODE_MIN_MAJOR" ]; then
    local arch
    case "$(uname -m)" in
      x86_64) arch=x64 ;;
      aarch64) arch=arm64 ;;
      *) echo "k8shell: node $major is too old and no Node.js package exists for $(uname -m)" >&2; return 1 ;;
    esac
    local prefix="${XDG_CACHE_HOME:-$HOME/.cache}/k8shell/node-$K8SHELL_NODE_VERSION"
    local bin="$prefix/node_modules/node-linux-$arch/bin"
    if [ ! -x "$bin/node" ]; then
      echo "k8shell: node $major is older than $K8SHELL_NODE_MIN_MAJOR; fetching Node.js $K8SHELL_NODE_VERSION from npm"
      mkdir -p "$prefix"
      npm install --prefix "$prefix" --no-save --no-audit --no-fund --loglevel=error "node-linux-$arch@$K8SHELL_NODE_VERSION"
    fi
    export PATH="$bin:$PATH"
  fi
  local dir="$K8SHELL_ROOT/tests/oidc-provider"
  # npm ci again only when the lock file changed since the last install.
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "k8shell: installing the test OpenID Provider (npm ci)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

# OpenSSH's sshd: the baseline of the SSH proxy benchmark, started by the
# benchmark on a loopback port with its own config. Installed without
# starting the distribution's sshd service (policy-rc.d refuses it).
k8shell_bench_deps() {
  if [ -x /usr/sbin/sshd ]; then
    return
  fi
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | k8shell_as_root tee "$policy" >/dev/null
    k8shell_as_root chmod 755 "$policy"
    created=1
  fi
  echo "k8shell: installing openssh-server (for the benchmark's baseline)"
  DEBIAN_FRONTEND=noninteractive k8shell_as_root apt-get install -y -qq --no-install-recommends openssh-server
  if [ "$created" = 1 ]; then
    k8shell_as_root rm -f "$policy"
  fi
}

# k8shelld runs as PID 1 in images that may have no libc, so it is built
# statically (glibc with crt-static; only the gnu target is available here).
# Prints the binary's path.
k8shell_build_static_k8shelld() {
  local triple target
  triple="$(rustc -vV | sed -n 's/^host: //p')"
  target="${CARGO_TARGET_DIR:-$K8SHELL_ROOT/target}"
  local var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    # `|| return`: a failed build must not hand back a stale binary.
  env "$var=-C target-feature=+crt-static" \
    cargo build --release --locked --target "$triple" -p k8shell-k8shelld --bin k8shelld >&2 || return 1

  echo "$target/$triple/release/k8shelld"
}
