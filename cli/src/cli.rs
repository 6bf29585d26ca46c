//! The command line: subcommands, options, help texts and examples.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// `consul-lock`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "consul-lock",
    version,
    // As Go's flag package: a flag given twice takes its last value.
    args_override_self = true,
    about = "Run a command while holding a Consul lock or semaphore, inspect and watch locks",
    long_about = "Run a command while holding a Consul lock or semaphore (what `consul lock` does, \
                  with loss detected before anyone else can take over), show who holds a lock, \
                  watch leadership change live, or watch a leader election fail over in a demo \
                  that needs no Consul.\n\n\
                  The Consul agent is found as Consul's own tools find it: CONSUL_HTTP_ADDR \
                  (default 127.0.0.1:8500), CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE, \
                  CONSUL_HTTP_SSL, CONSUL_CACERT, ...; the --http-addr, --token, ... options \
                  override them.",
    after_help = "Examples:\n  \
                  consul-lock run service/cron -- ./nightly-job.sh\n  \
                  consul-lock run -n 3 service/workers -- ./worker --queue jobs\n  \
                  consul-lock status service/cron\n  \
                  consul-lock watch service/cron\n  \
                  consul-lock demo\n\n\
                  Run `consul-lock <command> --help` for each command's options, exit codes and \
                  examples."
)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a command while holding a lock (or a semaphore slot), like `consul lock`.
    Run(RunArgs),
    /// Show who holds a lock or a semaphore's slots, and who waits.
    Status(StatusArgs),
    /// Print one line per leadership change of a lock or semaphore, live, until Ctrl-C.
    Watch(WatchArgs),
    /// Watch contenders elect a leader and fail over, on a simulated Consul (or a real agent).
    Demo(DemoArgs),
}

/// Options for reaching the Consul agent. Each overrides the environment variable named in its
/// help; unset, the variable (or Consul's default) applies.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Consul agent (override the CONSUL_* environment variables)")]
pub(crate) struct HttpFlags {
    /// The agent's address: host:port, http://host:port, https://host:port or unix:///path
    /// [env: CONSUL_HTTP_ADDR, default 127.0.0.1:8500]
    #[arg(long, value_name = "ADDR")]
    pub(crate) http_addr: Option<String>,
    /// The ACL token [env: CONSUL_HTTP_TOKEN]. Wins over CONSUL_HTTP_TOKEN_FILE (but not over
    /// --token-file)
    #[arg(long, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
    /// A file holding the ACL token [env: CONSUL_HTTP_TOKEN_FILE]
    #[arg(long, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
    /// PEM file of CA certificates to verify the agent with [env: CONSUL_CACERT]
    #[arg(long, value_name = "PATH")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Directory of PEM CA certificates [env: CONSUL_CAPATH]
    #[arg(long, value_name = "DIR")]
    pub(crate) ca_path: Option<PathBuf>,
    /// PEM client certificate, for agents that verify clients [env: CONSUL_CLIENT_CERT]
    #[arg(long, value_name = "PATH")]
    pub(crate) client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key [env: CONSUL_CLIENT_KEY]
    #[arg(long, value_name = "PATH")]
    pub(crate) client_key: Option<PathBuf>,
    /// The name to check the agent's certificate against [env: CONSUL_TLS_SERVER_NAME]
    #[arg(long, value_name = "NAME")]
    pub(crate) tls_server_name: Option<String>,
    /// The datacenter to use (default: the agent's)
    #[arg(long, value_name = "DC")]
    pub(crate) datacenter: Option<String>,
    /// The namespace (Consul Enterprise) [env: CONSUL_NAMESPACE]
    #[arg(long, value_name = "NS")]
    pub(crate) namespace: Option<String>,
    /// The admin partition (Consul Enterprise) [env: CONSUL_PARTITION]
    #[arg(long, value_name = "PARTITION")]
    pub(crate) partition: Option<String>,
    /// Let any server answer reads (`?stale`): for status and watch. `run` accepts it, as Go's
    /// `consul lock` does, and keeps its reads consistent (a lock can't trust a stale answer)
    #[arg(long)]
    pub(crate) stale: bool,
}

/// `consul-lock run`.
#[derive(Debug, Args)]
#[command(
    long_about = "Acquires a lock at <PREFIX>/.lock (or, with -n N > 1, a slot of a semaphore of N \
                  under <PREFIX>), then runs the child while holding it, and releases it when the \
                  child exits. The keys and the protocol are Go's, so `consul lock` and \
                  `consul-lock run` on the same prefix exclude each other.\n\n\
                  The child's environment gets CONSUL_LOCK_HELD=true, CONSUL_LOCK_KEY, \
                  CONSUL_LOCK_SESSION, the fencing token CONSUL_LOCK_SEQUENCE (the ModifyIndex of \
                  the hold: it only grows from one holder to the next; pass it with writes and \
                  refuse smaller ones) and CONSUL_LOCK_INDEX (the key's LockIndex, what Go exposes; \
                  not a fencing token, as it restarts when the key is deleted). SIGINT, SIGTERM and SIGHUP sent to consul-lock are passed on to the \
                  child; after a SIGINT or SIGTERM the child has --kill-grace to exit, then gets SIGKILL \
                  (at once at a second signal). If the lock is lost (session invalidated, key taken or deleted, or no \
                  renewal acknowledged within the session TTL), the child gets SIGTERM, then SIGKILL \
                  after --kill-grace; the lock is released and the key cleaned up on every way out.\n\n\
                  `consul lock` command lines work unchanged: options are also read in Go's spelling \
                  (-timeout=1s, -http-addr addr, -n=3, -shell=false, -try, -stale, ...), and they end \
                  at the prefix: everything after it is the child's.",
    after_help = "Exit codes:\n  \
                  0  the child ran and exited (whatever its status, unless --child-exit-code)\n  \
                  1  usage error, no agent, permission denied, or no lock (--timeout, Ctrl-C while \
                  waiting, a key of another kind)\n  \
                  2  the child failed (non-zero exit or killed by a signal), with --child-exit-code\n  \
                  3  the lock was lost while the child ran; the child was terminated\n\n\
                  Examples:\n  \
                  consul-lock run service/cron -- ./nightly-job.sh\n  \
                  consul-lock run --timeout 10s service/cron -- 'pg_dump mydb > /backup/db.sql'\n  \
                  consul-lock run -n 2 --child-exit-code service/encoders -- ./encode.sh\n  \
                  consul-lock run --shell=false service/cron -- /usr/bin/rsync -a src/ dst/\n  \
                  consul-lock run --json service/cron -- ./job | grep '^{\"event\"'"
)]
pub(crate) struct RunArgs {
    /// How many may hold at once: 1 is a lock at PREFIX/.lock, more is a semaphore under
    /// PREFIX (every contender must use the same N)
    #[arg(short = 'n', long = "limit", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) limit: u32,
    /// Give up after waiting this long for the lock (a Go duration: 500ms, 10s, 1m30s); exit 1.
    /// Default: wait for ever. (-try is Go's old name for it)
    #[arg(long, visible_alias = "try", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// How many failed reads of the held key in a row to bear (1 s apart) before giving the
    /// lock up, as Go's -monitor-retry
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) monitor_retry: u32,
    /// The session's name (default: "Consul lock for 'CHILD' at 'PREFIX'", as Go's)
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// Run the child through a shell: `$SHELL -c "<child...>"` (/bin/sh when SHELL is unset), as
    /// Go does; --shell=false runs the child's argv directly
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) shell: bool,
    /// Give the child this process's standard input (default: /dev/null)
    #[arg(long)]
    pub(crate) pass_stdin: bool,
    /// Exit 2 when the child failed (non-zero exit, or killed by a signal)
    #[arg(long)]
    pub(crate) child_exit_code: bool,
    /// How long the child has to exit, after the lock is lost (SIGTERM) or a SIGINT/SIGTERM is
    /// passed on, before it gets SIGKILL
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) kill_grace: Duration,
    /// Wait in line: contenders holding with --queue take the lock in the order they came,
    /// and a handoff wakes only the next in line, not every waiter (entries under
    /// PREFIX/.lock/.queue/). Go's `consul lock` and unqueued contenders may share the key
    /// safely, but can overtake. A lock only (-n 1)
    #[arg(long)]
    pub(crate) queue: bool,
    /// Say what happens on standard error
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Print one JSON object per event on standard output (waiting, acquired, child_started,
    /// signal, lost, child_exited, released, gave_up, error); the child's output shares stdout
    #[arg(long)]
    pub(crate) json: bool,
    /// The key prefix: the lock is PREFIX/.lock (a leading / is dropped)
    #[arg(value_name = "PREFIX")]
    pub(crate) prefix: String,
    /// The command to run while holding the lock (after `--`)
    #[arg(value_name = "CHILD", required = true, num_args = 1.., trailing_var_arg = true,
          allow_hyphen_values = true)]
    pub(crate) child: Vec<String>,
    #[command(flatten)]
    pub(crate) http: HttpFlags,
}

/// `consul-lock status`.
#[derive(Debug, Args)]
#[command(
    long_about = "Shows who holds a lock or a semaphore's slots: the holding session, its name and \
                  node (from /v1/session/info), the key's LockIndex and ModifyIndex, and for a \
                  semaphore its limit, holders and waiting contenders.\n\n\
                  <KEY_OR_PREFIX> may be a lock key (e.g. service/leader, as Go's api.Lock uses), \
                  or a prefix used with `consul lock` / `consul-lock run` (the lock is \
                  <PREFIX>/.lock, the semaphore's keys live under <PREFIX>).\n\n\
                  \"Since\": Consul keeps no wall-clock time for keys or sessions; what it has is \
                  the Raft index of the acquiring write (the key's ModifyIndex, unless the holder \
                  wrote the key again) and of the session's creation (CreateIndex). Those are shown.",
    after_help = "Exit codes: 0 the state was read (held, free or absent), 1 usage or agent error.\n\n\
                  Examples:\n  \
                  consul-lock status service/cron\n  \
                  consul-lock status service/leader\n  \
                  consul-lock status --json service/workers"
)]
pub(crate) struct StatusArgs {
    /// Print the state as one JSON object
    #[arg(long)]
    pub(crate) json: bool,
    /// A lock key, or a `consul lock` prefix (lock at PREFIX/.lock, or a semaphore)
    #[arg(value_name = "KEY_OR_PREFIX")]
    pub(crate) target: String,
    #[command(flatten)]
    pub(crate) http: HttpFlags,
}

/// `consul-lock watch`.
#[derive(Debug, Args)]
#[command(
    long_about = "Prints the current leader, then one line each time leadership changes (a new \
                  holder, the lock released, the key deleted; for a semaphore, the set of holders), \
                  as it happens: it waits on Consul's blocking reads, it does not poll. Runs until \
                  Ctrl-C. The key does not need to exist yet.",
    after_help = "Exit codes: 0 stopped by Ctrl-C (or SIGTERM), 1 usage or agent error.\n\n\
                  Examples:\n  \
                  consul-lock watch service/cron\n  \
                  consul-lock watch --json service/leader | jq .holder"
)]
pub(crate) struct WatchArgs {
    /// Print one JSON object per change
    #[arg(long)]
    pub(crate) json: bool,
    /// A lock key, or a `consul lock` prefix
    #[arg(value_name = "KEY_OR_PREFIX")]
    pub(crate) target: String,
    #[command(flatten)]
    pub(crate) http: HttpFlags,
}

/// `consul-lock demo`.
#[derive(Debug, Args)]
#[command(
    long_about = "Starts a few contenders for one lock, each with its own client and session, each \
                  running a leader loop (acquire, lead until told to step down or until the lock is \
                  lost, contend again). Then it disrupts the leader three ways and shows each \
                  failover live, with timestamps:\n\n  \
                  1. crash: the leader's session is destroyed (as when its node fails); the others \
                  wait out the lock-delay;\n  \
                  2. step down: the leader releases; the next one takes over at once;\n  \
                  3. partition: the leader's network is black-holed (a fault proxy drops every \
                  byte). It learns it may have lost the lock when no renewal is acknowledged within \
                  the session TTL, which is before Consul can let anyone else in.\n\n\
                  Finally it prints a summary: leadership changes, failover times, and whether two \
                  contenders ever believed they led at once (they must not).\n\n\
                  By default it runs on a simulated Consul served over HTTP on loopback (the test \
                  kit's), so it needs nothing installed; --consul runs it against a real agent.",
    after_help = "Exit codes: 0 the demo ran and no overlap was seen, 1 otherwise.\n\n\
                  Examples:\n  \
                  consul-lock demo\n  \
                  consul-lock demo --quick --contenders 3\n  \
                  consul-lock demo --consul 127.0.0.1:8500\n  \
                  consul-lock demo --json > demo.jsonl"
)]
pub(crate) struct DemoArgs {
    /// How many contenders
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..=8))]
    pub(crate) contenders: u32,
    /// Skip the partition (which takes 10-25 s: a session TTL and a lock-delay)
    #[arg(long)]
    pub(crate) quick: bool,
    /// Run against this Consul agent (host:port) instead of the simulator; keys live under
    /// consul-lock/demo/
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) consul: Option<String>,
    /// The sessions' lock-delay (0s to 60s): how long a crashed leader's key stays closed
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) lock_delay: Duration,
    /// How long each leader leads before the next disruption
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) hold: Duration,
    /// The simulator's seed (its session ids and expiry jitter)
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Print one JSON object per event, and the summary as the last one
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses a Go duration (`500ms`, `10s`, `1m30s`), as Consul's tools take them.
fn parse_duration(s: &str) -> Result<Duration, String> {
    consul_lock_core::duration::parse(s)
        .map_err(|e| format!("{e} (use a Go duration such as 500ms, 10s or 1m30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("consul-lock").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> RunArgs {
        match parse(args) {
            Ok(Cli {
                command: Command::Run(run),
            }) => run,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn run_takes_options_prefix_and_child() {
        let r = run(&[
            "run",
            "-n",
            "2",
            "--timeout",
            "1.5s",
            "svc/x",
            "--",
            "sleep",
            "-x",
            "1",
        ]);
        assert_eq!(r.limit, 2);
        assert_eq!(r.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(r.prefix, "svc/x");
        assert_eq!(r.child, ["sleep", "-x", "1"]);
        assert!(r.shell);
        assert_eq!(r.monitor_retry, 3);
        assert_eq!(r.kill_grace, Duration::from_secs(5));
    }

    #[test]
    fn child_needs_no_double_dash_and_keeps_its_flags() {
        let r = run(&["run", "svc/x", "ls", "-l", "--json"]);
        assert_eq!(r.child, ["ls", "-l", "--json"]);
        assert!(!r.json);
    }

    #[test]
    fn shell_is_a_boolean_flag() {
        assert!(!run(&["run", "--shell=false", "p", "c"]).shell);
        assert!(run(&["run", "--shell", "p", "c"]).shell);
        assert!(run(&["run", "--shell=true", "p", "c"]).shell);
    }

    #[test]
    fn http_flags_parse() {
        let r = run(&[
            "run",
            "--http-addr",
            "10.0.0.1:8500",
            "--token",
            "t",
            "--datacenter",
            "dc2",
            "p",
            "c",
        ]);
        assert_eq!(r.http.http_addr.as_deref(), Some("10.0.0.1:8500"));
        assert_eq!(r.http.token.as_deref(), Some("t"));
        assert_eq!(r.http.datacenter.as_deref(), Some("dc2"));
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse(&["run", "p"]).is_err(), "a child is required");
        assert!(
            parse(&["run", "--timeout", "10", "p", "c"]).is_err(),
            "a unit is required"
        );
        assert!(parse(&["demo", "--contenders", "1"]).is_err());
        assert!(
            parse(&["run", "-n", "0", "p", "c"]).is_err(),
            "the limit must be positive"
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
