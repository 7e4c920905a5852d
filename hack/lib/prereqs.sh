# shellcheck shell=bash
# ensure_prereqs WHO: what the harness needs from the machine, checked (and installed) in one place for hack/demo.sh
# and hack/test.sh. As root on Debian the missing packages are installed with apt-get (one line says which); anything
# still missing is reported in ONE line with the fix, and ensure_prereqs returns 1. Without root nothing is installed:
# the root-only parts (the real node, image builds) are then skipped by the callers, and a line says so.
#
# Packages: buildah and mmdebstrap build the images (lorafleet_dev.images); containerd, runc,
# containernetworking-plugins, iptables and busybox-static run the real node (lorafleet_dev.node).
LORAFLEET_DEBIAN_PACKAGES=(buildah mmdebstrap containerd runc containernetworking-plugins iptables busybox-static)

_prereq_missing_packages() {
  local pkg
  for pkg in "${LORAFLEET_DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$pkg"
  done
}

ensure_prereqs() {
  local who="$1" missing="" out tool
  if ! command -v go >/dev/null; then
    echo "${who}: Go is missing (Kubernetes, CoreDNS, kube-router and MinIO are built from source through the Go module proxy): install Go 1.25 or newer from https://go.dev/dl and put it on PATH" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "${who}: not root: no real node and no image builds (they need root); nothing to install" >&2
    return 0
  fi
  if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    for tool in buildah mmdebstrap containerd runc iptables; do
      command -v "$tool" >/dev/null || missing+="$tool "
    done
    if [ -n "${missing:-}" ]; then
      echo "${who}: missing ${missing% } and no apt-get here: install them with your package manager (plus the CNI plugins in /usr/lib/cni and a static busybox)" >&2
      return 1
    fi
    return 0
  fi
  missing="$(_prereq_missing_packages)"
  [ -z "$missing" ] && return 0
  echo "${who}: installing Debian packages: ${missing% } (apt-get; about a minute)" >&2
  # shellcheck disable=SC2086  # a list of package names
  if ! out="$( (export DEBIAN_FRONTEND=noninteractive; apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing || { apt-get -o DPkg::Lock::Timeout=300 update -qq && apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing; }) 2>&1 </dev/null)"; then
    echo "${who}: could not install ${missing% } (apt-get: $(printf '%s\n' "$out" | grep -E '^E:' | tail -1)); fix: apt-get update && apt-get install ${missing% }" >&2
    return 1
  fi
  missing="$(_prereq_missing_packages)"
  if [ -n "$missing" ]; then
    echo "${who}: still missing ${missing% } after apt-get; fix: apt-get install ${missing% }" >&2
    return 1
  fi
}

# ensure_disk WHO NEED_GIB: enough free space for a run. MinIO refuses every write (XMinioStorageFull, "minimum
# free drive threshold") that would leave less than 1% of its filesystem's total size available, so each filesystem
# the harness writes to needs NEED_GIB plus 1% of its size *available* (df's Available: root's reserve does not
# count). Checked: the filesystems holding ${LORAFLEET_CACHE:-~/.cache/lorafleet}, ${TMPDIR:-/tmp} and, as root,
# /var/lib/containers and /var/lib/containerd (images), or the paths in LORAFLEET_DISK_PATHS (colon-separated). When
# one is short, what lorafleet owns and rebuilds on demand is freed first (as root `python -m lorafleet_dev.images
# prune`: superseded images; pytest's basetemps and the demo's and benchmarks' folders in TMPDIR that nothing has
# touched for an hour), unless LORAFLEET_DISK_FREE=0, and one line says how much that freed; if still short, ONE line
# names the filesystem, what is needed and the largest lorafleet users, and ensure_disk returns 1.
_disk_paths() {
  if [ -n "${LORAFLEET_DISK_PATHS:-}" ]; then
    tr ':' '\n' <<<"$LORAFLEET_DISK_PATHS"
    return
  fi
  echo "${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}"
  echo "${TMPDIR:-/tmp}"
  if [ "$(id -u)" = 0 ]; then
    echo /var/lib/containers
    echo /var/lib/containerd
  fi
}

# _disk_worst NEED_GIB: "short_bytes avail_bytes total_bytes device mountpoint" of the filesystem (among
# _disk_paths', each counted once) furthest below NEED_GIB plus 1% of its size; short_bytes <= 0 when none is short.
_disk_worst() {
  local need_gib="$1" path
  _disk_paths | while IFS= read -r path; do
    [ -n "$path" ] || continue
    while [ ! -e "$path" ] && [ "$path" != / ]; do path="$(dirname "$path")"; done  # not created yet: its parent's
    df -P -B1 -- "$path" 2>/dev/null | awk 'NR == 2 { print $2, $4, $1, $6 }' || true
  done | sort -u -k4,4 | awk -v need="$need_gib" '
    { short = need * 2^30 + $1 / 100 - $2
      if (worst == "" || short > worst) { worst = short; line = sprintf("%.0f %s %s %s %s", short, $2, $1, $3, $4) } }
    END { if (line != "") print line }'
}

# _disk_free_tmp DIR: removes lorafleet's leftovers in DIR that nothing has modified for an hour: the demo's
# (lorafleet-demo-*) and the benchmarks' (lfbench-*, lorafleet-bench-*, lorafleet-serving-bench-*) work folders and
# pytest's basetemps (pytest-of-USER/pytest-N), but not the basetemp of a running session (its .lock holds its pid).
_disk_free_tmp() {
  local dir="$1" d pid
  for d in "$dir"/lorafleet-demo-* "$dir"/lfbench-* "$dir"/lorafleet-bench-* "$dir"/lorafleet-serving-bench-* \
    "$dir/pytest-of-$(id -un)"/pytest-*; do
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    pid="$(cat "$d/.lock" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    if [ -z "$(find "$d" -mmin -60 -print -quit 2>/dev/null)" ]; then
      rm -rf -- "$d"
    fi
  done
}

_disk_gib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 2^30 }'; }

# _disk_users MOUNT: the five largest of lorafleet's (rebuildable) disk users on that filesystem, "path N GiB, ...".
_disk_users() {
  local mount="$1" path tmp="${TMPDIR:-/tmp}"
  for path in "${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}" /var/lib/containers/storage /var/lib/containerd \
    "$HOME/.cache/go-build" "$HOME/go/pkg/mod" "$PWD/.venv" "$tmp"/pytest-of-* "$tmp"/lorafleet-* "$tmp"/lfbench-*; do
    [ -e "$path" ] && [ "$(df -P -- "$path" 2>/dev/null | awk 'NR == 2 { print $6 }')" = "$mount" ] || continue
    du -sxb -- "$path" 2>/dev/null | tail -1
  done | sort -rn | head -5 | awk '{ printf "%s%s %.1f GiB", (NR > 1 ? ", " : ""), $2, $1 / 2^30 }'
}

ensure_disk() {
  local who="$1" need="$2" short avail total dev mount before freed=""
  read -r short avail total dev mount <<<"$(_disk_worst "$need")"
  [ -n "${short:-}" ] || return 0  # df found nothing to check: nothing to say
  if [ "$short" -gt 0 ] && [ "${LORAFLEET_DISK_FREE:-1}" != 0 ]; then
    before="$avail"
    _disk_free_tmp "${TMPDIR:-/tmp}"
    if [ "$(id -u)" = 0 ] && [ -x .venv/bin/python ] && command -v buildah >/dev/null; then
      .venv/bin/python -m lorafleet_dev.images prune >/dev/null 2>&1 || true
    fi
    read -r short avail total dev mount <<<"$(_disk_worst "$need")"
    freed="removed $(_disk_gib $((avail > before ? avail - before : 0))) GiB of lorafleet's rebuildable leftovers; "
    if [ "$short" -le 0 ]; then
      echo "${who}: ${freed}now $(_disk_gib "$avail") GiB free on ${dev} (mounted at ${mount})" >&2
      return 0
    fi
  fi
  [ "$short" -gt 0 ] || return 0
  echo "${who}: only $(_disk_gib "$avail") GiB free on ${dev} (mounted at ${mount}); ${freed}${who} needs about ${need} GiB plus 1% of the filesystem ($(_disk_gib $((total / 100))) GiB) that MinIO keeps free: free space (largest lorafleet users: $(_disk_users "$mount"))" >&2
  return 1
}

# disk_need_gib WARM_GIB: the NEED_GIB of ensure_disk for a run that writes WARM_GIB once everything is built, plus
# what a first run adds to the caches (du on the development machine, 2026-12-03): the Kubernetes components,
# CoreDNS, kube-router and MinIO, built from source, 11 GiB (Go's build and module caches 10.2, the binaries 0.9);
# as root, lorafleet's images 17 GiB (buildah's storage 5.3, containerd's copy 10.2, the wheelhouse 0.9).
disk_need_gib() {
  local need="$1" cache="${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}"
  compgen -G "$cache/bin/kube-apiserver-*" >/dev/null || need=$((need + 11))
  if [ "$(id -u)" = 0 ] && [ ! -f "$cache/images/built/vllm-cpu.json" ]; then
    need=$((need + 17))
  fi
  echo "$need"
}
