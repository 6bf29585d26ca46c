//! `consul-lock`: run a command while holding a Consul lock or semaphore (what `consul lock`
//! does, on consul-lock's safer machine), show who holds a lock, watch leadership change live,
//! and watch a leader election fail over in a self-contained demo.
//!
//! ```text
//! consul-lock run service/cron -- ./nightly-job.sh      # one at a time, cluster-wide
//! consul-lock run -n 3 service/workers -- ./worker       # at most three at once
//! consul-lock status service/cron                       # who holds it, since when
//! consul-lock watch service/cron                        # one line per leadership change
//! consul-lock demo                                      # a live failover demo, no Consul needed
//! ```
//!
//! Exit codes of `run` follow Go's `consul lock`: 0 success, 1 usage, agent or acquisition
//! failure, 2 the child failed (with `--child-exit-code`); and 3 when the lock was lost while the
//! child ran (the child was terminated), which Go reports as 0.

mod cli;
mod consul;
mod demo;
mod exec;
mod flags;
mod goflags;
mod log;
mod run;
mod status;

use std::process::ExitCode;

use clap::Parser as _;

/// A command that failed: what to tell the user, and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The exit code.
    pub(crate) code: u8,
    /// What kind of failure, for `--json` readers.
    pub(crate) kind: Kind,
    /// What went wrong and what to do about it.
    pub(crate) message: String,
}

/// What kind of failure a [`Failure`] is: the `kind` of a `--json` `error` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The command line (or a setting from the environment) is unusable.
    Usage,
    /// No agent answered at the address.
    AgentUnavailable,
    /// The TLS handshake with the agent failed (certificate, server name, client certificate).
    Tls,
    /// The token may not do what was asked.
    PermissionDenied,
    /// Consul does not know the token.
    TokenNotFound,
    /// The key is of another kind (a plain key, a semaphore for a lock, another limit).
    Conflict,
    /// No lock within `--timeout`.
    Timeout,
    /// A signal ended the wait for the lock.
    Interrupted,
    /// The child could not be started.
    ChildNotStarted,
    /// The release or the cleanup was not confirmed.
    ReleaseFailed,
    /// Anything else.
    Other,
}

impl Kind {
    /// Its name in JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Usage => "usage",
            Kind::AgentUnavailable => "agent_unavailable",
            Kind::Tls => "tls",
            Kind::PermissionDenied => "permission_denied",
            Kind::TokenNotFound => "token_not_found",
            Kind::Conflict => "conflict",
            Kind::Timeout => "timeout",
            Kind::Interrupted => "interrupted",
            Kind::ChildNotStarted => "child_not_started",
            Kind::ReleaseFailed => "release_failed",
            Kind::Other => "other",
        }
    }
}

impl Failure {
    /// A failure with exit code 1 (usage, agent, acquisition).
    pub(crate) fn new(message: impl Into<String>) -> Failure {
        Failure::of(Kind::Other, message)
    }

    /// A failure of `kind`, with exit code 1.
    pub(crate) fn of(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            kind,
            message: message.into(),
        }
    }

    /// A usage error, with exit code 1.
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure::of(Kind::Usage, message)
    }
}

/// `arg` quoted for a message, cut to its first 80 characters when longer (a key can be 32 KiB),
/// with its length in bytes then.
pub(crate) fn quoted(arg: &str) -> String {
    match arg.char_indices().nth(80) {
        Some((at, _)) => format!("{:?}… ({} bytes)", arg.get(..at).unwrap_or_default(), arg.len()),
        None => format!("{arg:?}"),
    }
}

/// Refuses a key (or prefix) `arg` with a control character in it: Consul answers such keys with
/// a bare 400, and printing them back would garble the terminal. `what` names it ("the prefix").
pub(crate) fn check_key(what: &str, arg: &str) -> Result<(), Failure> {
    match arg.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(Failure::usage(format!(
            "{what} {} holds a control character (U+{:04X}) at byte {at}: Consul refuses keys with \
             control characters; use printable ones",
            quoted(arg),
            u32::from(c)
        ))),
        None => Ok(()),
    }
}

/// With `--json`, a command line that did not parse is an `error` event too.
fn usage_event(json: bool, message: &str) {
    if json {
        out::event(
            "error",
            ("unix_ms", out::unix_ms()),
            &serde_json::json!({ "kind": Kind::Usage.as_str(), "message": message, "exit_code": 1 }),
        );
    }
}

fn main() -> ExitCode {
    log::init();
    // Go's spellings (`-timeout=1s`, `-http-addr x`) first, then clap.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let json = goflags::wants_json(&raw);
    let args = match goflags::normalize(raw) {
        Ok(args) => args,
        Err(failure) => {
            usage_event(json, &failure.message);
            out::error(&failure.message);
            return ExitCode::from(failure.code);
        }
    };
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() {
                usage_event(json, e.render().to_string().lines().next().unwrap_or_default());
            }
            // Help and version go to stdout and exit 0; usage errors exit 1, as Go's do.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            out::error(&format!("could not start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            cli::Command::Run(args) => run::run(args).await,
            cli::Command::Status(args) => status::status(args).await,
            cli::Command::Watch(args) => status::watch(args).await,
            cli::Command::Demo(args) => demo::demo(args).await,
        }
    });
    // Background work (a session destroy after a cancel) gets a moment; nothing blocks on it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            out::error(&failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Everything the tool prints for the user goes through here. Writes go straight to the locked
/// standard streams (no `println!`), so that a closed pipe (`consul-lock watch | head -1`) is not
/// a panic: the write error is ignored.
pub(crate) mod out {
    use std::io::Write as _;

    /// One line on standard output.
    pub(crate) fn line(text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }

    /// One JSON object as a line on standard output.
    pub(crate) fn json(value: &serde_json::Value) {
        line(&value.to_string());
    }

    /// An event as one JSON object on standard output: `{"event":<event>,"<stamp>":<ms>,...}`
    /// with the event's name and time first (easy to `grep`), then `fields` (an object).
    pub(crate) fn event(event: &str, stamp: (&str, u64), fields: &serde_json::Value) {
        use serde_json::Value;
        let mut text = format!(
            "{{\"event\":{},{}:{}",
            Value::from(event),
            Value::from(stamp.0),
            stamp.1
        );
        if let Value::Object(fields) = fields {
            for (name, value) in fields {
                if name != "event" && name != stamp.0 {
                    text.push_str(&format!(",{}:{value}", Value::from(name.as_str())));
                }
            }
        }
        text.push('}');
        line(&text);
    }

    /// A diagnostic line on standard error, prefixed with the tool's name.
    pub(crate) fn info(text: &str) {
        let _ = writeln!(std::io::stderr().lock(), "consul-lock: {text}");
    }

    /// An error on standard error.
    pub(crate) fn error(text: &str) {
        let _ = writeln!(std::io::stderr().lock(), "consul-lock: error: {text}");
    }

    /// Milliseconds since the Unix epoch, for JSON events.
    pub(crate) fn unix_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// The wall-clock time of day in UTC, `HH:MM:SS.mmm`.
    pub(crate) fn clock() -> String {
        let ms = unix_ms();
        let day_ms = ms % 86_400_000;
        format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            day_ms / 3_600_000,
            day_ms / 60_000 % 60,
            day_ms / 1000 % 60,
            day_ms % 1000
        )
    }

    /// A duration as seconds with millisecond precision: `1.234s`.
    pub(crate) fn secs(d: std::time::Duration) -> String {
        format!("{:.3}s", d.as_secs_f64())
    }

    /// A duration in whole milliseconds, for JSON.
    pub(crate) fn millis(d: std::time::Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}
