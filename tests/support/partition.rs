//! Network partitions on loopback: iptables rules that drop every packet between two sets of
//! addresses (each test node listens, and dials, from its own 127.0.0.x), removed when the
//! [`Partition`] is dropped — also when the test panics. Every rule carries a comment naming
//! its partition, so a run that was killed leaves rules that the next run removes
//! ([`remove_leftovers`]).

use std::net::IpAddr;
use std::process::Command;

use uuid::Uuid;

/// The comment prefix of every rule the tests add.
const TAG: &str = "warren-test-partition";

/// A partition in force until dropped.
pub struct Partition {
    tag: String,
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Drops every packet between any address of `side` and any of `others`, both ways
    /// (TCP and UDP alike; the broker, the database and the nodes' HTTP stay reachable on
    /// 127.0.0.1).
    pub fn isolate(side: &[IpAddr], others: &[IpAddr]) -> Partition {
        remove_leftovers();
        let tag = format!("{TAG}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let mut partition = Partition {
            tag: tag.clone(),
            rules: Vec::new(),
        };
        for a in side {
            for b in others {
                for (from, to) in [(a, b), (b, a)] {
                    let rule: Vec<String> = [
                        "INPUT",
                        "-s",
                        &from.to_string(),
                        "-d",
                        &to.to_string(),
                        "-m",
                        "comment",
                        "--comment",
                        &tag,
                        "-j",
                        "DROP",
                    ]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                    iptables("-I", &rule).unwrap_or_else(|e| panic!("iptables: {e}"));
                    partition.rules.push(rule);
                }
            }
        }
        partition
    }

    /// Ends the partition now.
    pub fn heal(self) {
        drop(self);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(error) = iptables("-D", &rule) {
                eprintln!("could not remove a partition rule ({}): {error}", self.tag);
            }
        }
    }
}

/// Removes rules a killed test run left behind.
pub fn remove_leftovers() {
    let Ok(output) = Command::new("iptables").args(["-S", "INPUT"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(rule) = line.strip_prefix("-A ")
            && rule.contains(TAG)
        {
            let args: Vec<String> = rule
                .split_whitespace()
                .map(|s| s.trim_matches('"').to_owned())
                .collect();
            let _ = iptables("-D", &args);
        }
    }
}

fn iptables(action: &str, rule: &[String]) -> Result<(), String> {
    let output = Command::new("iptables")
        .arg("-w")
        .arg(action)
        .args(rule)
        .output()
        .map_err(|e| format!("iptables does not run: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}
