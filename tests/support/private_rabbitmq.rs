//! A RabbitMQ node of one test's own, on its own AMQP and distribution ports, node name and
//! data folder, that the test may stop, kill and start again (never the shared broker
//! `scripts/test` runs). No plugins: tests read its queues with `rabbitmqctl -n`. Removed when
//! dropped. [`PrivateRabbitMq::start_tls`] makes one that listens only for TLS.

use std::path::PathBuf;
use std::process::Command;

use uuid::Uuid;

use super::{path, run};

/// How a test takes the node down.
#[derive(Clone, Copy, Debug)]
pub enum BrokerStop {
    /// `rabbitmqctl stop`: connections are closed, the node shuts down in order.
    Stop,
    /// SIGKILL of the Erlang VM: connections just die; durable queues and persistent
    /// messages are recovered at the next start.
    Kill,
}

/// A private broker node.
pub struct PrivateRabbitMq {
    /// Its node name, for `rabbitmqctl -n`.
    pub node: String,
    port: u16,
    dist_port: u16,
    base: PathBuf,
    /// Listens for `amqps://` on `port`.
    tls: bool,
    /// A TLS node's plain listener, if it has one.
    plain_port: Option<u16>,
}

/// What a TLS-only node presents and trusts.
pub struct BrokerTls<'a> {
    /// Its certificate and key.
    pub server: &'a super::certs::Pair,
    /// The CA whose client certificates it accepts (and EXTERNAL logs in by common name).
    pub client_ca: &'a std::path::Path,
    /// Also listen without TLS, on [`PrivateRabbitMq::plain_uri`] (to compare the two).
    pub plain_too: bool,
}

impl PrivateRabbitMq {
    /// Starts a fresh node and waits until it serves.
    pub fn start() -> PrivateRabbitMq {
        Self::start_with(None)
    }

    /// Starts a fresh node that listens only for TLS, asks clients for a certificate (without
    /// requiring one) and offers EXTERNAL login by the certificate's common name besides PLAIN.
    pub fn start_tls(tls: BrokerTls<'_>) -> PrivateRabbitMq {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<BrokerTls<'_>>) -> PrivateRabbitMq {
        let id = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let base = std::env::temp_dir().join(format!("warren-rabbit-{id}"));
        std::fs::create_dir_all(&base).expect("broker folder");
        let port = super::free_port([127, 0, 0, 1]).port();
        let plain_port = tls
            .as_ref()
            .filter(|tls| tls.plain_too)
            .map(|_| super::free_port([127, 0, 0, 1]).port());
        let plugins = match &tls {
            None => "[].\n",
            Some(_) => "[rabbitmq_auth_mechanism_ssl].\n",
        };
        std::fs::write(base.join("enabled_plugins"), plugins).expect("plugins file");
        // Erlang's distribution port must differ from every other node's.
        let dist_port = super::free_port([127, 0, 0, 1]).port();
        let broker = PrivateRabbitMq {
            node: format!("warren-{id}@localhost"),
            port,
            dist_port,
            base,
            tls: tls.is_some(),
            plain_port,
        };
        if let Some(tls) = &tls {
            broker.write_tls_config(tls);
        }
        // The server scripts run as the rabbitmq user.
        run("chown", &["-R", "rabbitmq:rabbitmq", path(&broker.base)]);
        broker.start_again();
        broker
    }

    /// Restarts a TLS node presenting `tls.server` from now on.
    pub fn present(&self, tls: BrokerTls<'_>) {
        self.write_tls_config(&tls);
        self.stop(BrokerStop::Stop);
        self.start_again();
    }

    fn write_tls_config(&self, tls: &BrokerTls<'_>) {
        let tcp = match self.plain_port {
            Some(plain) => format!("listeners.tcp.default = 127.0.0.1:{plain}"),
            None => "listeners.tcp = none".to_owned(),
        };
        let config = format!(
            "{tcp}\n\
             listeners.ssl.default = 127.0.0.1:{}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n",
            self.port,
            path(tls.client_ca),
            path(&tls.server.cert),
            path(&tls.server.key),
        );
        std::fs::write(self.base.join("rabbitmq.conf"), config).expect("config file");
    }

    /// Its AMQP URI (`amqps://` for a TLS-only node).
    pub fn uri(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// A TLS node's plain URI, when it listens without TLS too.
    pub fn plain_uri(&self) -> Option<String> {
        self.plain_port
            .map(|port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the node (again) on its data, waiting until it serves.
    pub fn start_again(&self) {
        let status = self
            .server_command("rabbitmq-server")
            .arg("-detached")
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "rabbitmq-server -detached failed");
        // The control tool cannot wait for a VM that is not up yet: ask until it answers.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !self.ctl_ok(&["await_startup", "--timeout", "60"]) {
            assert!(
                std::time::Instant::now() < deadline,
                "the private broker did not start; see {}",
                self.base.join("log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Takes the node down.
    pub fn stop(&self, how: BrokerStop) {
        match how {
            BrokerStop::Stop => {
                self.ctl(&["stop"]);
            }
            BrokerStop::Kill => {
                let pid = std::fs::read_to_string(self.base.join("pid")).expect("pid file");
                run("kill", &["-9", pid.trim()]);
                // Down once the control tool no longer reaches it.
                for _ in 0..100 {
                    if !self.ctl_ok(&["ping"]) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                panic!("the killed broker still answers");
            }
        }
    }

    /// Runs `rabbitmqctl -n <node>` with `args`, asserting success; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = self.ctl_command(args).output().expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn ctl_ok(&self, args: &[&str]) -> bool {
        self.ctl_command(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("rabbitmqctl");
        command.args(["-q", "-n", &self.node]).args(args);
        command
    }

    fn server_command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir("/")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.base.join("log"))
            .env("RABBITMQ_PID_FILE", self.base.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.base.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.base.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.base.join("none-advanced.config"),
            );
        if !self.tls {
            // The plain listener; a TLS-only node has `listeners.tcp = none` in its file.
            command
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", self.port.to_string());
        }
        command
    }
}

impl Drop for PrivateRabbitMq {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.base.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).output();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
