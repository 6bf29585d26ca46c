//! `consul-lock run`: Go's `consul lock`, on the tokio driver.
//!
//! 1. Check the agent (a read of the lock key: no agent, a wrong address, a denied token are
//!    reported here, naming where the address and the token came from).
//! 2. Acquire: a lock on `<prefix>/.lock`, or a slot of a semaphore on `<prefix>` (`-n N`, N > 1),
//!    with Go's session name, monitor retries and (with `--timeout`) try-once.
//! 3. Run the child with the fencing token in its environment; pass SIGINT, SIGTERM and SIGHUP
//!    on; on loss, SIGTERM then (after `--kill-grace`) SIGKILL.
//! 4. Release, then delete the key if nobody else uses it (Go's cleanup), on every way out.

use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvGet, SessionInfo};
use consul_lock_core::machine::{HoldOptions, LockOptions, Waiting};
use consul_lock_tokio::{Client, Error, Hold, LockError, LockGuard, LossReason, SemaphoreOptions};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::cli::RunArgs;
use crate::consul::{Api, driver_failure, explain_driver};
use crate::exec::{self, Exit, Running, Sig};
use crate::flags::{self, Resolved};
use crate::goflags;
use crate::out;
use crate::{Failure, Kind};

/// Exit code: the lock was lost while the child ran (Go exits 0 then).
pub(crate) const EXIT_LOST: u8 = 3;
/// Exit code: the child failed, with `--child-exit-code`.
pub(crate) const EXIT_CHILD_FAILED: u8 = 2;

/// Go's `consul lock` retries a failed monitor read after 1 s (its `defaultMonitorRetryTime`).
const MONITOR_RETRY_TIME: Duration = Duration::from_secs(1);
/// How long the checks, the release and the cleanup may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Reports what happens: JSON lines on stdout with `--json`, text on stderr with `--verbose`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Events {
    json: bool,
    verbose: bool,
}

impl Events {
    /// A JSON event with `--json`, and a line on stderr with `--verbose` (both with both).
    fn emit(self, event: &str, fields: Value, human: impl FnOnce() -> String) {
        if self.json {
            out::event(event, ("unix_ms", out::unix_ms()), &fields);
        }
        if self.verbose {
            out::info(&human());
        }
    }

    /// Like [`emit`](Self::emit), and the line goes to stderr even without `--verbose`.
    fn emit_always(self, event: &str, fields: Value, human: impl FnOnce() -> String) {
        if self.json {
            out::event(event, ("unix_ms", out::unix_ms()), &fields);
        }
        out::info(&human());
    }

    /// An error, also as a JSON event with its kind (the message itself always goes to stderr).
    fn error(self, failure: &Failure) {
        if self.json {
            out::event(
                "error",
                ("unix_ms", out::unix_ms()),
                &json!({ "kind": failure.kind.as_str(), "message": failure.message, "exit_code": failure.code }),
            );
        }
    }
}

/// A machine-readable name and a sentence for why a hold was lost.
pub(crate) fn describe_loss(reason: &LossReason) -> (&'static str, String) {
    match reason {
        LossReason::SessionInvalidated => (
            "session_invalidated",
            "the session was invalidated (destroyed, or expired)".to_owned(),
        ),
        LossReason::RenewDeadline { since_ack } => (
            "renew_deadline",
            format!(
                "no session renewal was acknowledged for {} (the TTL): the lock may be free for others",
                out::secs(*since_ack)
            ),
        ),
        LossReason::KeyDeleted => ("key_deleted", "the key was deleted".to_owned()),
        LossReason::TakenBy(session) => (
            "taken_by",
            format!("session {} holds the key now", session.as_str()),
        ),
        LossReason::NotHeld => ("not_held", "the key is no longer held by this session".to_owned()),
        LossReason::Conflict { flags } => ("conflict", format!("the key was overwritten (flags {flags:#x})")),
        LossReason::MonitorFailed { failures, last } => (
            "monitor_failed",
            format!("{failures} reads of the key failed in a row (last: {last})"),
        ),
    }
}

/// The signals consul-lock passes on to the child.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, Failure> {
        let make =
            |kind| signal(kind).map_err(|e| Failure::new(format!("cannot install signal handlers: {e}")));
        Ok(Signals {
            int: make(SignalKind::interrupt())?,
            term: make(SignalKind::terminate())?,
            hup: make(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.int.recv() => Sig::Int,
            _ = self.term.recv() => Sig::Term,
            _ = self.hup.recv() => Sig::Hup,
        }
    }
}

/// What is being acquired.
struct Target {
    /// The lock key, or the semaphore's `.lock`.
    key: Key,
    /// 1 for a lock.
    limit: u32,
}

/// Runs `consul-lock run`.
pub(crate) async fn run(args: RunArgs) -> Result<u8, Failure> {
    let events = Events {
        json: args.json,
        verbose: args.verbose,
    };
    let result = run_inner(&args, events).await;
    if let Err(failure) = &result {
        events.error(failure);
    }
    result
}

async fn run_inner(args: &RunArgs, events: Events) -> Result<u8, Failure> {
    crate::check_key("the prefix", &args.prefix)?;
    if args.queue && args.limit > 1 {
        // A semaphore's slots have no line of their own: refusing beats a flag that does nothing.
        return Err(Failure::usage(format!(
            "--queue is for a lock (-n 1); -n {} is a semaphore",
            args.limit
        )));
    }
    let resolved = flags::resolve_from_process(&args.http)?;
    let prefix = args
        .prefix
        .strip_prefix('/')
        .unwrap_or(&args.prefix)
        .trim_end_matches('/');
    let usage = |e: &dyn std::fmt::Display| {
        Failure::usage(format!(
            "the prefix {} can't be used: {e}",
            crate::quoted(&args.prefix)
        ))
    };
    let target = Target {
        key: Key::new(prefix)
            .and_then(|k| k.join(".lock"))
            .map_err(|e| usage(&e))?,
        limit: args.limit,
    };
    let timeout = args.timeout.filter(|t| !t.is_zero());
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("Consul lock for '{}' at '{prefix}'", args.child.join(" ")));

    // The agent must answer, and the token read the key, before we wait on it for ever.
    let api = Api::new(&resolved)?;
    let what = format!("reading {}", target.key.as_str());
    api.call(&KvGet::new(target.key.clone()), REQUEST_TIMEOUT)
        .await
        .map_err(|e| api.failure(&what, &e))?;

    let client = Client::new(resolved.config.clone()).map_err(|e| driver_failure(&resolved, "setup", &e))?;
    // Try-once waits at most Consul's 10-minute blocking wait; longer timeouts use a timer.
    let try_once = timeout.filter(|t| *t <= HoldOptions::MAX_WAIT);
    // Go's flags mean the same for a lock and a semaphore.
    let tune = |hold: &mut HoldOptions| {
        hold.monitor_retries = Some(args.monitor_retry);
        hold.monitor_retry_time = MONITOR_RETRY_TIME;
        if let Some(wait) = try_once {
            hold.try_once = true;
            hold.wait_time = wait;
        }
        if let Some(session) = hold.session_options_mut() {
            session.name = name.clone();
        }
    };
    let lock = if target.limit == 1 {
        let mut options = LockOptions::new(target.key.as_str()).map_err(|e| usage(&e))?;
        tune(&mut options.hold);
        if args.queue {
            options.waiting = Waiting::Queue;
        }
        client.lock(options).map(Hold::from)
    } else {
        let mut options = SemaphoreOptions::new(prefix, target.limit).map_err(|e| usage(&e))?;
        tune(&mut options.hold);
        client.semaphore(options).map(Hold::from)
    }
    .map_err(|e| driver_failure(&resolved, "setup", &e))?;

    let mut signals = Signals::install()?;
    let kind = if target.limit == 1 { "lock" } else { "semaphore" };
    events.emit(
        "waiting",
        json!({ "key": target.key.as_str(), "limit": target.limit, "session_name": name }),
        || {
            if target.limit == 1 {
                format!("waiting for the lock {}", target.key.as_str())
            } else {
                format!(
                    "waiting for a slot of the semaphore {prefix} (limit {})",
                    target.limit
                )
            }
        },
    );
    let started = Instant::now();
    let outer_timeout = async {
        match timeout {
            Some(t) if try_once.is_none() => tokio::time::sleep(t).await,
            _ => std::future::pending().await,
        }
    };
    let mut retries = lock.retries();
    let report_retries = async {
        while let Ok(retry) = retries.next().await {
            let next_in = retry
                .next_try
                .saturating_duration_since(std::time::Instant::now());
            let text = || {
                format!(
                    "try {} failed: {}; trying again in {} (giving up after a minute of failures)",
                    retry.attempt,
                    retry.cause,
                    out::secs(next_in)
                )
            };
            if events.json {
                out::event(
                    "retrying",
                    ("unix_ms", out::unix_ms()),
                    &json!({ "attempt": retry.attempt, "cause": retry.cause, "next_try_ms": out::millis(next_in) }),
                );
            }
            if events.verbose || retry.attempt == 1 {
                // The first failure of a run always shows: a wait on a dead agent is never silent.
                out::info(&text());
            }
        }
        std::future::pending::<()>().await;
    };
    let acquired = tokio::select! {
        result = lock.acquire() => result,
        () = report_retries => Err(Error::DriverStopped),
        () = outer_timeout => Err(Error::GaveUp),
        sig = signals.next() => {
            // Dropping the acquire future cancelled the attempt: wait for its session to go.
            close(lock).await;
            return Err(Failure::of(Kind::Interrupted, format!(
                "interrupted by SIG{} while waiting for the {kind}", sig.name()
            )));
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(Error::GaveUp) => {
            let waited = started.elapsed();
            let holder = describe_holder(&api, &target).await;
            if events.json {
                out::event(
                    "gave_up",
                    ("unix_ms", out::unix_ms()),
                    &json!({ "key": target.key.as_str(), "waited_ms": out::millis(waited) }),
                );
            }
            close(lock).await;
            return Err(Failure::of(
                Kind::Timeout,
                format!(
                    "timeout: no {kind} within {} ({}){holder}; giving up",
                    out::secs(timeout.unwrap_or(waited)),
                    goflags::typed("timeout"),
                ),
            ));
        }
        Err(e) => {
            return Err(driver_failure(
                &resolved,
                &format!("acquiring {}", target.key.as_str()),
                &e,
            ));
        }
    };
    let waited = started.elapsed();
    let token = guard.token().clone();
    events.emit(
        "acquired",
        json!({
            "key": token.key.as_str(),
            "session": token.session.as_str(),
            "lock_index": token.lock_index,
            "sequence": token.sequence(),
            "waited_ms": out::millis(waited),
        }),
        || {
            format!(
                "acquired {} after {} (session {}, LockIndex {}, sequence {})",
                token.key.as_str(),
                out::secs(waited),
                token.session.as_str(),
                token.lock_index,
                token.sequence()
            )
        },
    );

    let spec = exec::Spec {
        argv: &args.child,
        shell: args.shell,
        pass_stdin: args.pass_stdin,
    };
    let outcome = match exec::spawn(&spec, &token) {
        Ok(running) => {
            events.emit("child_started", json!({ "pid": running.child.id() }), || {
                format!("started the child (pid {})", running.child.id().unwrap_or(0))
            });
            supervise(running, guard, &mut signals, args.kill_grace, events).await
        }
        Err(e) => Outcome::SpawnFailed(e, guard),
    };

    let (code, guard, spawn_error) = match outcome {
        Outcome::Exited(exit, guard) => {
            let code = if exit.failed() && args.child_exit_code {
                EXIT_CHILD_FAILED
            } else {
                0
            };
            (code, Some(guard), None)
        }
        Outcome::Lost(guard) => (EXIT_LOST, Some(guard), None),
        Outcome::SpawnFailed(e, guard) => (
            1,
            Some(guard),
            Some(format!(
                "could not start the child {:?}: {e}",
                args.child.join(" ")
            )),
        ),
        // The child was terminated as the lock can't be vouched for any more: a loss.
        Outcome::DriverStopped => (EXIT_LOST, None, None),
    };
    let lost = code == EXIT_LOST;
    if let Err(failure) = finish(&lock, guard, lost, &resolved, &target, events).await {
        if !lost {
            return Err(failure);
        }
        // The loss is what the caller must learn (exit 3); the failed cleanup is reported too.
        events.error(&failure);
        out::error(&failure.message);
    }
    match spawn_error {
        Some(message) => Err(Failure::of(Kind::ChildNotStarted, message)),
        None => Ok(code),
    }
}

/// How the child's run ended.
enum Outcome {
    /// The child exited by itself (or after a forwarded signal).
    Exited(Exit, LockGuard),
    /// The lock was lost; the child was terminated.
    Lost(LockGuard),
    /// The child could not be started.
    SpawnFailed(std::io::Error, LockGuard),
    /// The driver's task is gone.
    DriverStopped,
}

/// Waits for the child, passing signals on; on loss, terminates it.
///
/// SIGINT and SIGTERM are passed on and start the grace period: a child still there when it ends
/// gets SIGKILL (Go's `consul lock` does the same after 5 s), and so does one still there at a
/// second SIGINT or SIGTERM, at once. SIGHUP is only passed on (a child may take it as "reload").
async fn supervise(
    mut running: Running,
    mut guard: LockGuard,
    signals: &mut Signals,
    grace: Duration,
    events: Events,
) -> Outcome {
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        let kill_timer = async {
            match kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = running.child.wait() => {
                let exit = match status {
                    Ok(status) => Exit::from_status(status),
                    Err(_) => Exit { code: None, signal: None },
                };
                child_exited(events, exit);
                return Outcome::Exited(exit, guard);
            }
            lost = guard.lost() => {
                let (code, text) = match &lost {
                    Ok(reason) => describe_loss(reason),
                    Err(_) => ("driver_stopped", "the lock's driver stopped".to_owned()),
                };
                events.emit_always("lost", json!({ "reason": code, "detail": text }), || {
                    format!("lock lost: {text}; terminating the child")
                });
                let exit = terminate(&mut running, grace, events).await;
                child_exited(events, exit);
                return match lost {
                    Ok(_) => Outcome::Lost(guard),
                    Err(_) => Outcome::DriverStopped,
                };
            }
            () = kill_timer => {
                kill(&mut running, events, &format!(
                    "the child outlived the {} grace period after the signal: SIGKILL",
                    out::secs(grace)
                ));
                kill_at = None;
            }
            sig = signals.next() => {
                let terminating = sig != Sig::Hup;
                if terminating && kill_at.is_some() {
                    kill(&mut running, events, &format!(
                        "second SIG{}: SIGKILL to the child at once", sig.name()
                    ));
                    kill_at = None;
                    continue;
                }
                let result = running.signal(sig);
                events.emit("signal", json!({ "signal": format!("SIG{}", sig.name()), "forwarded": result.is_ok() }), || {
                    if terminating {
                        format!(
                            "received SIG{}; passed it on to the child, which gets SIGKILL if it is still \
                             there in {} (or at a second signal)",
                            sig.name(),
                            out::secs(grace)
                        )
                    } else {
                        format!("received SIG{}; passed it on to the child", sig.name())
                    }
                });
                if terminating {
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
            }
        }
    }
}

/// SIGKILL to the child (its group), saying why.
fn kill(running: &mut Running, events: Events, why: &str) {
    events.emit_always("kill", json!({ "reason": why }), || why.to_owned());
    if running.signal(Sig::Kill).is_err() {
        let _ = running.child.start_kill();
    }
}

/// SIGTERM, then SIGKILL after `grace`; waits for the child.
async fn terminate(running: &mut Running, grace: Duration, events: Events) -> Exit {
    let _ = running.signal(Sig::Term);
    if let Ok(Ok(status)) = tokio::time::timeout(grace, running.child.wait()).await {
        return Exit::from_status(status);
    }
    kill(
        running,
        events,
        &format!(
            "the child outlived the {} grace period: SIGKILL",
            out::secs(grace)
        ),
    );
    match running.child.wait().await {
        Ok(status) => Exit::from_status(status),
        Err(_) => Exit {
            code: None,
            signal: None,
        },
    }
}

fn child_exited(events: Events, exit: Exit) {
    events.emit(
        "child_exited",
        json!({ "code": exit.code, "signal": exit.signal }),
        || format!("the child ended: {}", exit.describe()),
    );
}

/// Releases and cleans up (Go's `Unlock` then `Destroy`, ignoring "in use"). After a loss
/// (`lost`) there is nothing to release: the release only ends the session, and no "released" is
/// reported.
async fn finish(
    lock: &Hold,
    guard: Option<LockGuard>,
    lost: bool,
    resolved: &Resolved,
    target: &Target,
    events: Events,
) -> Result<(), Failure> {
    if let Some(guard) = guard {
        match tokio::time::timeout(REQUEST_TIMEOUT, guard.release()).await {
            Ok(Ok(())) if lost => events.emit(
                "not_released",
                json!({ "key": target.key.as_str(), "reason": "lost" }),
                || format!("{} not released: the lock was already lost", target.key.as_str()),
            ),
            Ok(Ok(())) => events.emit("released", json!({ "key": target.key.as_str() }), || {
                format!("released {}", target.key.as_str())
            }),
            Ok(Err(e)) => {
                return Err(Failure::of(
                    Kind::ReleaseFailed,
                    format!(
                        "release failed: {}",
                        explain_driver(resolved, &format!("releasing {}", target.key.as_str()), &e)
                    ),
                ));
            }
            Err(_) => {
                return Err(Failure::of(
                    Kind::ReleaseFailed,
                    format!(
                        "release failed: no answer within {}; the session expires by itself within \
                         twice its TTL",
                        out::secs(REQUEST_TIMEOUT)
                    ),
                ));
            }
        }
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, lock.destroy()).await {
        Ok(Ok(())) => events.emit("cleaned_up", json!({ "key": target.key.as_str() }), || {
            format!("deleted {} (nobody else uses it)", target.key.as_str())
        }),
        Ok(Err(Error::Lock(LockError::InUse | LockError::SemaphoreInUse))) => events.emit(
            "cleanup_skipped",
            json!({ "key": target.key.as_str(), "reason": "in_use" }),
            || format!("left {} in place: others use it", target.key.as_str()),
        ),
        Ok(Err(e)) => {
            return Err(Failure::of(
                Kind::ReleaseFailed,
                format!(
                    "cleanup failed: {}",
                    explain_driver(resolved, &format!("deleting {}", target.key.as_str()), &e)
                ),
            ));
        }
        Err(_) => {
            return Err(Failure::of(
                Kind::ReleaseFailed,
                format!("cleanup failed: no answer within {}", out::secs(REQUEST_TIMEOUT)),
            ));
        }
    }
    Ok(())
}

/// ", held by session … (\"name\", node …)" for the timeout message; empty when unknown.
async fn describe_holder(api: &Api, target: &Target) -> String {
    if target.limit > 1 {
        return format!("; all {} slots are held", target.limit);
    }
    let Ok(read) = api
        .call(&KvGet::new(target.key.clone()), Duration::from_secs(3))
        .await
    else {
        return String::new();
    };
    let Some(session) = read.value.and_then(|pair| pair.session) else {
        return String::new();
    };
    match api
        .call(&SessionInfo::new(session.clone()), Duration::from_secs(3))
        .await
    {
        Ok(info) => match info.value {
            Some(entry) => format!(
                "; {} is held by session {} ({:?} on node {})",
                target.key.as_str(),
                session.as_str(),
                entry.name,
                entry.node
            ),
            None => format!(
                "; {} is held by session {}",
                target.key.as_str(),
                session.as_str()
            ),
        },
        Err(_) => format!(
            "; {} is held by session {}",
            target.key.as_str(),
            session.as_str()
        ),
    }
}

/// Ends `lock` and waits for its cleanup (its session destroyed), so that the process doesn't
/// exit with a session left for Consul to expire; bounded, since an unreachable agent could make
/// the destroy retry for up to twice the TTL.
async fn close(lock: Hold) {
    let _ = tokio::time::timeout(Duration::from_secs(5), lock.close()).await;
}
