//! Processes and ports the tests and benchmarks share: a free port, a command that must
//! succeed, a temporary path as text, a child that dies with its parent, a process's memory.

/// A port free for both TCP and UDP on `ip` (a cluster port carries both), below the kernel's
/// ephemeral range: one from that range (what binding port 0 gives) can be taken by a node's
/// outgoing connection, dialing or probing another, before the node meant to listen on it
/// starts.
pub fn free_port(ip: [u8; 4]) -> std::net::SocketAddr {
    use rand::Rng;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut rng = rand::rng();
    loop {
        let addr = std::net::SocketAddr::from((ip, rng.random_range(10_000..ephemeral)));
        let bound = std::net::TcpListener::bind(addr).map(drop);
        if bound.is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// Runs `program` (from `/`, where every user may be) and asserts it succeeded.
pub fn run(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("{program} does not run: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A temporary path as text.
pub fn path(path: &std::path::Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// Has the kernel SIGKILL the child when the thread that spawns it ends. `kill_on_drop` needs
/// the parent to run its destructors; a test run that is itself killed (a timeout, a stopped
/// session) would otherwise leave its nodes running, busy on the machine's two cores and
/// holding the shared test addresses.
pub fn die_with_the_test(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure calls only prctl, which is async-signal-safe,
    // and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc), if it runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rest = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    rest.split_whitespace().next()?.parse().ok()
}
