//! What `/proc` tells about a process (a benchmark's contender, or a test itself): resident
//! memory, CPU time, and its TCP connections to the agent.

use std::collections::HashSet;
use std::fs;
use std::io;

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`. It is 100 on every
/// architecture Linux runs on today (the kernel fixes it for user space).
const TICKS_PER_SECOND: f64 = 100.0;

/// The process's resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// The CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / TICKS_PER_SECOND),
        _ => Err(io::Error::other("malformed /proc/<pid>/stat")),
    }
}

/// How many established TCP connections the process has open to `port` on the loopback.
pub fn connections_to(pid: u32, port: u16) -> io::Result<usize> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
            inodes.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        count += text
            .lines()
            .skip(1)
            .filter(|row| established_to(row, port).is_some_and(|inode| inodes.contains(inode)))
            .count();
    }
    Ok(count)
}

/// The socket inode of a `/proc/net/tcp` row if it is an established connection to `port`.
fn established_to(row: &str, port: u16) -> Option<&str> {
    let fields: Vec<&str> = row.split_whitespace().collect();
    let remote_port = fields.get(2)?.rsplit(':').next()?;
    let established = *fields.get(3)? == "01";
    (established && u16::from_str_radix(remote_port, 16).ok()? == port).then_some(*fields.get(9)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("rss") > 0);
        assert!(cpu_seconds(pid).expect("cpu") >= 0.0);
    }

    #[test]
    fn counts_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let pid = std::process::id();
        assert_eq!(connections_to(pid, port).expect("before"), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _server = listener.accept().expect("accept");
        // The accepted side's remote port is the client's, so only the client's row counts.
        assert_eq!(connections_to(pid, port).expect("after"), 1);
    }

    #[test]
    fn parses_a_row() {
        let row = "   1: 0100007F:D2F0 0100007F:2134 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(established_to(row, 0x2134), Some("4242"));
        assert_eq!(established_to(row, 0x2135), None);
        let listening = row.replacen(" 01 ", " 0A ", 1);
        assert_eq!(established_to(&listening, 0x2134), None);
    }
}
