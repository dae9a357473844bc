# Shared by scripts/test, scripts/demo, scripts/bench and scripts/cluster-bench: make sure a
# RabbitMQ broker answers on 127.0.0.1:5672 with the plugins Warren's tests and demo use
# (management, prometheus, and the consistent-hash exchange that partitioned queues need), and
# (for the tests) that PostgreSQL answers on 127.0.0.1:5432 with a login role warren. Installs
# rabbitmq-server and postgresql with apt and starts them when needed; never restarts a running
# one.

warren_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() {
  timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Waits up to $2 seconds for "$1" (a command) to succeed.
wait_for() {
  local what=$1 seconds=$2
  for _ in $(seq 1 "$((seconds * 2))"); do
    if eval "$what" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  return 1
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "==> installing rabbitmq-server"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if ! port_open 5672; then
    echo "==> starting RabbitMQ"
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
    if ! wait_for "as_root rabbitmqctl -q await_startup" 90 || ! wait_for "port_open 5672" 30; then
      echo "RabbitMQ did not start; see /var/log/rabbitmq" >&2
      return 1
    fi
  fi
  # The consistent-hash exchange feeds partitioned queues (--partitions); it opens no port.
  local plugins="rabbitmq_management rabbitmq_prometheus rabbitmq_consistent_hash_exchange"
  local enabled
  enabled=$(as_root rabbitmq-plugins list -e -m 2>/dev/null || true)
  if ! port_open 15672 || ! port_open 15692 ||
    ! grep -qx rabbitmq_consistent_hash_exchange <<<"$enabled"; then
    echo "==> enabling $plugins"
    # shellcheck disable=SC2086 # one word per plugin
    as_root rabbitmq-plugins enable $plugins >/dev/null
    if ! wait_for "port_open 15672 && port_open 15692" 60; then
      echo "RabbitMQ management/prometheus plugins did not come up" >&2
      return 1
    fi
  fi
  echo "==> RabbitMQ $(as_root rabbitmqctl -q version 2>/dev/null) answers on 127.0.0.1:5672"
}

# Runs psql as the postgres OS user over the local socket, where a fresh Debian install lets it
# in by peer authentication (no password exists yet). runuser needs neither a password nor a
# PAM session; su is the fallback where util-linux's runuser is missing. Runs from / because
# postgres may not enter the caller's directory (a checkout under /root), and psql says so.
psql_as_postgres() {
  (
    cd /
    if command -v runuser >/dev/null 2>&1; then
      as_root runuser -u postgres -- psql -p 5432 -v ON_ERROR_STOP=1 -qAt "$@"
    else
      # su takes one command string: quote every argument for postgres's bash.
      as_root su -s /bin/bash postgres -c "psql -p 5432 -v ON_ERROR_STOP=1 -qAt $(printf '%q ' "$@")"
    fi
  )
}

# The tests connect with the constant URL postgres://warren:warren@127.0.0.1:5432/postgres (so
# nothing is exported here) and create and drop their own databases, hence CREATEDB. Installs
# postgresql with apt and starts (or, if there is none, creates) a cluster when needed; never
# restarts a running one.
ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    echo "==> installing postgresql"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  if ! port_open 5432; then
    # The package creates cluster "<version> main" but may not start it (no init system in a
    # container). Prefer the cluster configured for 5432, else the first one listed.
    local cluster
    cluster=$(pg_lsclusters --no-header | awk '$3 == 5432 { print $1, $2; exit }') || true
    [ -n "$cluster" ] || cluster=$(pg_lsclusters --no-header | awk 'NR == 1 { print $1, $2 }') || true
    if [ -n "$cluster" ]; then
      echo "==> starting PostgreSQL cluster $cluster"
      # shellcheck disable=SC2086 # "$cluster" is "<version> <name>", two arguments
      as_root pg_ctlcluster $cluster start || true
    else
      local version
      version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
      if [ -z "$version" ]; then
        echo "no PostgreSQL server under /usr/lib/postgresql; install the postgresql package" >&2
        return 1
      fi
      echo "==> creating and starting PostgreSQL cluster $version main"
      as_root pg_createcluster "$version" main --start >/dev/null || true
    fi
    if ! wait_for "port_open 5432" 60; then
      echo "PostgreSQL did not come up on 127.0.0.1:5432; see pg_lsclusters and /var/log/postgresql" >&2
      return 1
    fi
  fi
  # Create the role, or bring an existing one back to what the tests expect (its password may
  # have been changed, or it may lack LOGIN or CREATEDB). Cheap enough to run every time.
  if ! psql_as_postgres -c "DO \$\$ BEGIN
      IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'warren') THEN
        ALTER ROLE warren WITH LOGIN CREATEDB PASSWORD 'warren';
      ELSE
        CREATE ROLE warren WITH LOGIN CREATEDB PASSWORD 'warren';
      END IF;
    END \$\$"; then
    echo "could not create the PostgreSQL role warren as the postgres OS user" >&2
    return 1
  fi
  # Log in the way the tests do: password over TCP. pg_hba.conf decides whether that is allowed;
  # Debian's default has "host all all 127.0.0.1/32 scram-sha-256", which is enough.
  local out
  if ! out=$(PGPASSWORD=warren PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p 5432 -U warren -d postgres \
      -qAt -c 'select 1' -c 'show server_version' 2>&1) || [ "${out%%$'\n'*}" != 1 ]; then
    echo "$out" >&2
    echo "role warren cannot log in with a password on 127.0.0.1:5432 (psql's words above)." >&2
    local hba
    hba=$(psql_as_postgres -c 'show hba_file' 2>/dev/null) || hba=pg_hba.conf
    echo "If pg_hba.conf is the cause: $hba needs \"host all all 127.0.0.1/32 scram-sha-256\"" \
      "(or md5) above any line that matches first, then: pg_ctlcluster <version> <name> reload" >&2
    return 1
  fi
  echo "==> PostgreSQL ${out#*$'\n'} answers on 127.0.0.1:5432 (role warren)"
}

# The fault suite cuts the network between test nodes with iptables rules on loopback
# addresses (it needs root, as CI has). Installs iptables with apt when it is missing.
ensure_iptables() {
  if ! command -v iptables >/dev/null 2>&1; then
    echo "==> installing iptables"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
  fi
  as_root iptables -w -L INPUT -n >/dev/null
  echo "==> $(iptables -V) can cut loopback links"
}

# The monitoring test (tests/monitoring.rs) runs its own Prometheus on a free port, and
# promtool checks the alert rules: Debian's prometheus package has both. Nothing here starts
# its service; where the package's install starts it (an init system that allows it), it
# listens on :9090, which no test uses.
ensure_prometheus() {
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "==> installing prometheus"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus >/dev/null
  fi
  echo "==> $(prometheus --version 2>&1 | head -n 1)"
}

# scripts/diagrams renders the README's diagrams with Graphviz's dot.
ensure_graphviz() {
  if ! command -v dot >/dev/null 2>&1; then
    echo "==> installing graphviz"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      graphviz >/dev/null
  fi
}

# scripts/check-deploy validates the Kubernetes manifests offline with kubernetes-validate
# (PyPI; it carries the API schemas, so no cluster is needed).
ensure_kubernetes_validate() {
  if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
    echo "==> installing kubernetes-validate"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      kubernetes-validate
  fi
}
