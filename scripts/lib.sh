# Shared by scripts/test, scripts/demo and scripts/bench: make sure a RabbitMQ broker answers
# on 127.0.0.1:5672 with the plugins Warren's tests and demo read (management, prometheus).
# Installs rabbitmq-server with apt and starts it when needed; never restarts a running one.

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
  if ! port_open 15672 || ! port_open 15692; then
    echo "==> enabling rabbitmq_management and rabbitmq_prometheus"
    as_root rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >/dev/null
    if ! wait_for "port_open 15672 && port_open 15692" 60; then
      echo "RabbitMQ management/prometheus plugins did not come up" >&2
      return 1
    fi
  fi
  echo "==> RabbitMQ $(as_root rabbitmqctl -q version 2>/dev/null) answers on 127.0.0.1:5672"
}
