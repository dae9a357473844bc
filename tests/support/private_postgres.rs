//! A PostgreSQL server of one test's own, on its own port and data folder, that the test may
//! stop, kill and start again (never the shared server `scripts/test` runs). Built with the
//! server binaries of the installed PostgreSQL, run as the `postgres` user (the server refuses
//! root); removed when dropped.

use std::path::PathBuf;
use std::process::Command;

use uuid::Uuid;

use super::{path, run};

/// How a test stops the server.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// A clean shutdown that does not wait for clients (`pg_ctl -m fast`).
    Fast,
    /// No shutdown at all (`pg_ctl -m immediate`): like a crash, recovered at the next start.
    Immediate,
}

/// A running private server.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Creates a cluster (superuser `warren`, trust on loopback) and starts it.
    pub fn start() -> PrivatePostgres {
        let server = Self::create();
        server.start_again();
        server
    }

    /// Like [`Self::start`], with `ssl = on` presenting `server`'s certificate, and every
    /// connection over TCP without TLS refused (`hostnossl … reject`).
    pub fn start_tls(server: &super::certs::Pair) -> PrivatePostgres {
        let postgres = Self::create();
        let data = &postgres.data;
        postgres.replace_certificate(server);
        let mut conf =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf).expect("postgresql.conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .expect("pg_hba.conf");
        postgres.start_again();
        postgres
    }

    /// Puts `server`'s certificate and key in place of the ones it presents (takes effect at
    /// the next start).
    pub fn replace_certificate(&self, server: &super::certs::Pair) {
        for (from, to, mode) in [
            (&server.cert, "server.crt", "644"),
            (&server.key, "server.key", "600"),
        ] {
            let to = self.data.join(to);
            std::fs::copy(from, &to).expect("certificate copied");
            run("chown", &["postgres:postgres", path(&to)]);
            run("chmod", &[mode, path(&to)]);
        }
    }

    fn create() -> PrivatePostgres {
        let bin = server_bin();
        let data = std::env::temp_dir().join(format!(
            "warren-pg-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&data).expect("data folder");
        run("chown", &["postgres:postgres", path(&data)]);
        as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                path(&data),
                "-U",
                "warren",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        let port = super::free_port([127, 0, 0, 1]).port();
        PrivatePostgres { bin, data, port }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `postgres` (tests create what they need in it).
    pub fn url(&self) -> String {
        format!("postgres://warren:warren@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            path(&self.data)
        );
        as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                path(&self.data),
                "-o",
                &options,
                "-w",
                "-l",
                &self.log(),
                "start",
            ],
        );
    }

    /// Stops the server.
    pub fn stop(&self, how: Stop) {
        let mode = match how {
            Stop::Fast => "fast",
            Stop::Immediate => "immediate",
        };
        as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", path(&self.data), "-m", mode, "-w", "stop"],
        );
    }

    fn log(&self) -> String {
        format!("{}.log", self.data.display())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", path(&self.data), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(self.log());
    }
}

/// The newest installed server's binaries.
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs it)")
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server version")
}

fn as_postgres(program: &std::path::Path, args: &[&str]) {
    let mut all = vec!["-u", "postgres", "--", path(program)];
    all.extend_from_slice(args);
    run("runuser", &all);
}
