#!/usr/bin/env bash
# Installs the host packages moat and its tests need, only those that are missing, then checks
# that every one of them is there: a missing tool fails here, naming its Debian package, before
# any build starts. Idempotent; installing needs root.
#
#   scripts/install-deps.sh            install what is missing, then check
#   scripts/install-deps.sh --check    only check (installs nothing)
#   scripts/install-deps.sh --bench    also what scripts/bench.sh needs
#
# THE TABLE below is the one list of host commands that moat, its tests and its scripts run. A
# command a fresh Debian bookworm machine lacks must be here; a new one goes here, nowhere else.
set -euo pipefail

# command             Debian package    set    who runs it
TABLE='
qemu-system-x86_64    qemu-system-x86   all    crates/vm/src/qemu/: every sandbox VM
qemu-img              qemu-utils        all    crates/vm/src/disk.rs: overlay disks; tests read them back
qemu-io               qemu-utils        all    crates/vm/src/disk.rs tests: write into qcow2 layers
mkfs.ext4             e2fsprogs         all    crates/image/src/disk.rs: an image becomes a base disk
debugfs               e2fsprogs         all    crates/image/tests: read files back from a base disk
mmdebstrap            mmdebstrap        all    crates/image/src/base.rs: moat setup builds the base image
apt-cache             apt               all    crates/vm/src/assets.rs: finds the guest kernel package
apt-get               apt               all    crates/vm/src/assets.rs: downloads the guest kernel
dpkg-deb              dpkg              all    crates/vm/src/assets.rs: unpacks the guest kernel
busybox               busybox-static    all    crates/testkit, crates/vm/tests: a static busybox goes into test guests
docker-registry       docker-registry   all    crates/testkit: a real OCI registry on loopback
htpasswd              apache2-utils     all    crates/testkit: the registry with Basic auth
python3               python3           all    crates/cli/tests/sdk_python.rs, mcp.rs, network.rs: the Python SDK tests, the MCP client, the package index and test servers of the network tests
venv                  python3-venv      all    crates/cli/tests/sdk_python.rs, mcp.rs, api_fuzz.rs, kubernetes.rs: python3 -m venv for those tests (schemathesis from PyPI for api_fuzz.rs, kubernetes-validate for kubernetes.rs); network.rs: the pip wheel it brings (python3-pip-whl) goes into a guest
node                  nodejs            all    crates/cli/tests/sdk_typescript.rs: the TypeScript SDK tests (Node 18+)
npm                   npm               all    crates/cli/tests/sdk_typescript.rs: npm ci, npm pack of the TypeScript SDK
chromium              chromium          all    crates/cli/tests/console.rs: the web console in a headless browser
sh                    dash              all    crates/testkit, crates/vm/src/{cgroup,jail}.rs tests
unshare               util-linux        all    crates/vm/src/jail.rs tests: a jailed shell may not make namespaces
nsenter               util-linux        all    crates/cli/tests/network.rs: moat run and a test server inside network namespaces
kill                  procps            all    crates/cli/tests: kill -9 of a daemon or a QEMU
mount                 mount             all    crates/cli/tests/cli.rs: a small tmpfs (a full disk)
umount                mount             all    crates/cli/tests/cli.rs: unmounts it
ip                    iproute2          all    crates/net/tests: a real guest in a network namespace behind a TAP
curl                  curl              all    crates/net/tests: the HTTP client in that guest; scripts/patroni.sh: the REST API of Patroni
systemd-analyze       systemd           all    crates/cli/tests/systemd_unit.rs: verifies contrib/systemd/moat.service offline
ldd                   libc-bin          all    this script: is /bin/busybox static?
initdb                postgresql        all    scripts/postgres.sh: a throwaway PostgreSQL for the store tests (scripts/test.sh, crates/cli/tests/daemon_store.rs)
pg_ctl                postgresql        all    scripts/postgres.sh: starts, restarts and stops it
runuser               util-linux        all    scripts/postgres.sh: initdb and the server run as nobody, not root
patroni               patroni           all    scripts/patroni.sh: PostgreSQL members managed by Patroni, for crates/cli/tests/daemon_ha.rs (failover under a daemon)
python3-etcd          python3-etcd      all    scripts/patroni.sh: the etcd client of Patroni (one of the alternatives its package depends on)
etcd                  etcd-server       all    scripts/patroni.sh: the three-member etcd cluster Patroni keeps its leader key in
etcdctl               etcd-client       all    scripts/patroni.sh: the health of etcd, before Patroni starts
setpriv               util-linux        all    scripts/patroni.sh: etcd, Patroni and PostgreSQL run as nobody (exec in place: their pids are known)
runsc                 runsc             bench  bench/src/main.rs: gVisor, the peer the benchmark compares with
'

mode=install
sets=all
for arg in "$@"; do
  case $arg in
    --check) mode=check ;;
    --bench) sets="all bench" ;;
    *) echo "usage: $0 [--check] [--bench]" >&2; exit 2 ;;
  esac
done

# Whether `what` (a command of the table) is usable. Some need more than `command -v`.
present() {
  case $1 in
    # Test images carry the host's busybox into guests, which have no libc: it must be static.
    busybox) [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 ;;
    # Debian splits venv and ensurepip out of python3.
    venv)
      local probe ok=1
      probe=$(mktemp -d)
      python3 -m venv "$probe/v" >/dev/null 2>&1 || ok=0
      rm -rf "$probe"
      [ $ok = 1 ]
      ;;
    # Debian keeps PostgreSQL's server programs off PATH, in the version's directory.
    initdb|pg_ctl) ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1 ;;
    # A Python module of Debian's python3, the one Patroni runs on (python3 on PATH may be
    # another).
    python3-etcd) /usr/bin/python3 -c 'import etcd' >/dev/null 2>&1 ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# The table's rows of the chosen sets, as "command package".
rows() {
  local cmd pkg set why
  while read -r cmd pkg set why; do
    [ -n "$cmd" ] || continue
    case " $sets " in *" $set "*) echo "$cmd $pkg" ;; esac
  done <<<"$TABLE"
}

# Each probe runs once per phase: what the install phase found present is not probed again.
declare -A absent=()
while read -r cmd pkg; do
  present "$cmd" || absent[$cmd]=$pkg
done < <(rows)

if [ $mode = install ]; then
  export DEBIAN_FRONTEND=noninteractive
  updated=
  apt_update_once() {
    if [ -z "$updated" ]; then
      apt-get update -qq
      updated=1
    fi
  }
  # QEMU first and on its own: on machines that carry a newer qemu-utils from backports, apt
  # replaces it with the matching 7.2 one only when qemu-system-x86 is installed alone.
  if [ -n "${absent[qemu-system-x86_64]:-}" ]; then
    apt_update_once
    apt-get install -y -qq qemu-system-x86 >/dev/null
  fi
  need=()
  for pkg in "${absent[@]}"; do
    case " ${need[*]} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # `moat setup` (and the daemon's first start) download the guest kernel with apt-get
  # download, which needs package lists.
  if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt_update_once
  fi
fi

# The check: every command of the table is there now, whatever installed it.
missing=0
for cmd in $(rows | cut -d' ' -f1); do
  if [ -n "${absent[$cmd]:-}" ] && { [ $mode = check ] || ! present "$cmd"; }; then
    echo "missing: $cmd (Debian package ${absent[$cmd]})" >&2
    missing=1
  fi
done
if [ $missing = 1 ]; then
  echo "moat needs the packages above: run scripts/install-deps.sh as root (apt-get install <package>)" >&2
  exit 1
fi
