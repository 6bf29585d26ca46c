//! The drop-in conformance test: one table of `consul lock` command lines (flags in Go's
//! spelling, exit codes, signals, a lost lock, `-n`, `-pass-stdin`, with and without a shell,
//! bad input), each run by Go's `consul lock` (the agent's own binary, `$CONSUL_BIN lock`) and by
//! `consul-lock run`, on the same agent. The outcomes (exit code, whether the child ran, what it
//! wrote) must match, except where the case names one of the differences that cli/README.md
//! lists on purpose ("Intended differences from `consul lock`").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Running, Scratch, bin, destroy_session, kv, scrub, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::{ConsulAgent, require_agent};

const EXIT: Duration = Duration::from_secs(40);

/// Which implementation runs a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Go,
    Ours,
}

/// What happens while the command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Nothing: the command runs to its end.
    None,
    /// Another holder keeps the lock for the whole case.
    Held,
    /// This signal (`TERM`, `INT`) to the command once the child has started.
    Signal(&'static str),
    /// The lock's session is destroyed once the child has started.
    DestroySession,
}

/// One row of the table. In `flags` and `child`, `$D` is the case's scratch directory and `$A`
/// the agent's address.
struct Case {
    name: &'static str,
    flags: &'static [&'static str],
    child: &'static [&'static str],
    action: Action,
    stdin: Option<&'static str>,
    /// `CONSUL_HTTP_ADDR` points nowhere (the address comes from a flag).
    no_env_addr: bool,
    /// An intended difference (its name in cli/README.md), and our outcome's exit code.
    differs: Option<(&'static str, i32)>,
}

const fn case(name: &'static str, flags: &'static [&'static str], child: &'static [&'static str]) -> Case {
    Case {
        name,
        flags,
        child,
        action: Action::None,
        stdin: None,
        no_env_addr: false,
        differs: None,
    }
}

/// The child scripts: each writes `ran` (and `started` when it waits for something).
const RAN: &str = "touch $D/ran";
const WAITS_FOR_TERM: &str =
    "trap 'touch $D/got_term; exit 0' TERM; touch $D/ran $D/started; while :; do sleep 0.05; done";
const WAITS_FOR_INT: &str =
    "trap 'touch $D/got_int; exit 0' INT; touch $D/ran $D/started; while :; do sleep 0.05; done";
const IGNORES_TERM: &str = "trap '' TERM; touch $D/ran $D/started; while :; do sleep 0.05; done";
const FAILS_ON_TERM: &str = "trap 'exit 3' TERM; touch $D/ran $D/started; while :; do sleep 0.05; done";

fn table() -> Vec<Case> {
    vec![
        case("plain", &[], &[RAN]),
        case("-timeout=1s", &["-timeout=1s"], &[RAN]),
        case("--timeout=1s", &["--timeout=1s"], &[RAN]),
        case("-timeout 1s", &["-timeout", "1s"], &[RAN]),
        case("-- ends the flags", &["-timeout=1s", "--"], &[RAN]),
        Case {
            no_env_addr: true,
            ..case("-http-addr=", &["-http-addr=$A"], &[RAN])
        },
        Case {
            no_env_addr: true,
            ..case("-http-addr value", &["-http-addr", "$A"], &[RAN])
        },
        case(
            "-token -datacenter -stale",
            &["-token=anything", "-datacenter=dc1", "-stale"],
            &[RAN],
        ),
        case(
            "-name -monitor-retry -verbose",
            &["-name=conformance", "-monitor-retry=3", "-verbose"],
            &[RAN],
        ),
        case("-n=3", &["-n=3"], &[RAN]),
        case("-n 2", &["-n", "2"], &[RAN]),
        case(
            "-shell=false",
            &["-shell=false"],
            &["sh", "-c", "touch \"$0\"/ran", "$D"],
        ),
        case("-shell words joined", &[], &["touch", "$D/ran"]),
        case(
            "child flags are the child's",
            &[],
            &["echo", "-verbose", "-n=2", ">", "$D/out;", "touch", "$D/ran"],
        ),
        case("child exit 7", &[], &["touch $D/ran; exit 7"]),
        case(
            "-child-exit-code exit 7",
            &["-child-exit-code"],
            &["touch $D/ran; exit 7"],
        ),
        case("-child-exit-code exit 0", &["-child-exit-code"], &[RAN]),
        case(
            "-child-exit-code=false",
            &["-child-exit-code=false"],
            &["touch $D/ran; exit 7"],
        ),
        Case {
            stdin: Some("hello from stdin\n"),
            ..case("-pass-stdin", &["-pass-stdin"], &["cat > $D/out; touch $D/ran"])
        },
        Case {
            stdin: Some("hello from stdin\n"),
            ..case("no -pass-stdin", &[], &["cat > $D/out; touch $D/ran"])
        },
        Case {
            action: Action::Held,
            ..case("-timeout=1s, held", &["-timeout=1s"], &[RAN])
        },
        Case {
            action: Action::Held,
            ..case("-try=1s, held", &["-try=1s"], &[RAN])
        },
        Case {
            action: Action::Held,
            ..case(
                "-timeout 1s -verbose, held",
                &["-timeout", "1s", "-verbose"],
                &[RAN],
            )
        },
        Case {
            action: Action::Signal("TERM"),
            ..case("SIGTERM, child exits 0", &[], &[WAITS_FOR_TERM])
        },
        Case {
            action: Action::Signal("INT"),
            ..case("SIGINT, child exits 0", &[], &[WAITS_FOR_INT])
        },
        Case {
            action: Action::Signal("TERM"),
            ..case("SIGTERM, child ignores it", &[], &[IGNORES_TERM])
        },
        Case {
            action: Action::Signal("TERM"),
            differs: Some(("a failed child after a signal", 2)),
            ..case(
                "SIGTERM, child fails, -child-exit-code",
                &["-child-exit-code"],
                &[FAILS_ON_TERM],
            )
        },
        Case {
            action: Action::DestroySession,
            differs: Some(("exit 3 on loss", 3)),
            ..case("lock lost", &[], &[WAITS_FOR_TERM])
        },
        Case {
            action: Action::Held,
            ..case("bad: -n=2 where a lock is held", &["-n=2", "-timeout=1s"], &[RAN])
        },
        case("bad: unknown flag", &["-bogus"], &[RAN]),
        case("bad: -n=0", &["-n=0"], &[RAN]),
        case("bad: -timeout=bad", &["-timeout=bad"], &[RAN]),
        case("bad: -timeout=-1s", &["-timeout=-1s"], &[RAN]),
        case("bad: -shell=maybe", &["-shell=maybe"], &[RAN]),
        case("bad: -monitor-retry=x", &["-monitor-retry=x"], &[RAN]),
        case("bad: a flag without its value", &["-timeout"], &[]),
        case("bad: no child", &[], &[]),
    ]
}

/// What a run of a case came to.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    hung: bool,
    code: Option<i32>,
    ran: bool,
    out: String,
}

fn command(which: Impl, agent: &ConsulAgent) -> Command {
    let mut command = match which {
        Impl::Go => {
            let mut c = Command::new(agent.binary());
            c.arg("lock");
            c
        }
        Impl::Ours => {
            let mut c = Command::new(bin());
            c.arg("run");
            c
        }
    };
    scrub(&mut command);
    command.env("SHELL", "/bin/sh");
    command
}

fn run_case(which: Impl, agent: &ConsulAgent, case: &Case, index: usize) -> (Outcome, String) {
    let tag = format!("dropin-{index}-{which:?}");
    let scratch = Scratch::new(&tag);
    let prefix = unique_prefix(&tag);
    let fill = |s: &str| {
        s.replace("$D", &scratch.dir.display().to_string())
            .replace("$A", &agent.http_addr())
    };
    let holder = (case.action == Action::Held).then(|| {
        let mut c = command(Impl::Ours, agent);
        c.env("CONSUL_HTTP_ADDR", agent.http_addr()).args([
            &prefix,
            &format!(
                "touch '{}'; {}",
                scratch.path("held").display(),
                scratch.wait_for("release")
            ),
        ]);
        let running = Running::spawn(c);
        wait_for_file(&scratch.path("held"), EXIT);
        running
    });

    let mut c = command(which, agent);
    c.env(
        "CONSUL_HTTP_ADDR",
        if case.no_env_addr {
            "127.0.0.1:1".to_owned()
        } else {
            agent.http_addr()
        },
    );
    c.args(case.flags.iter().map(|f| fill(f)));
    if case.name != "bad: a flag without its value" {
        c.arg(&prefix);
    }
    c.args(case.child.iter().map(|f| fill(f)));
    c.stdin(if case.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(input) = case.stdin {
        // A command that exits at once (bad input) closes the pipe first: that is its outcome.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    // The child's start, or the command's end (it refused the command line).
    let mut started = || {
        let deadline = std::time::Instant::now() + EXIT;
        while !scratch.exists("started") && child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no start, no end in case {:?}",
                case.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        scratch.exists("started")
    };
    match case.action {
        Action::Signal(signal) => {
            if started() {
                std::thread::sleep(Duration::from_millis(200));
                let _ = Command::new("kill")
                    .args(["-s", signal, &child.id().to_string()])
                    .status();
            }
        }
        Action::DestroySession => {
            if started() {
                let pair = kv(agent, &format!("{prefix}/.lock")).expect("the lock is held");
                destroy_session(agent, pair.session.unwrap().as_str());
            }
        }
        Action::None | Action::Held => {}
    }
    // A command that does not end is an outcome too (`hung`), killed here with its child.
    let deadline = std::time::Instant::now() + EXIT;
    let mut hung = false;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            hung = true;
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &child.id().to_string()])
                .status();
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    scratch.touch("release");
    if let Some(holder) = holder {
        let (status, _, stderr) = holder.finish(EXIT);
        assert_eq!(status.code(), Some(0), "the holder: {stderr}");
    }
    let outcome = Outcome {
        hung,
        code: output.status.code(),
        ran: scratch.exists("ran"),
        out: scratch.read("out"),
    };
    let log = format!(
        "{which:?} {:?}: {outcome:?}\n  stdout: {}\n  stderr: {}",
        case.name,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    (outcome, log)
}

#[test]
fn consul_lock_run_behaves_as_go_consul_lock() {
    let Some(agent) = require_agent() else { return };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut failures = Vec::new();
    for (index, case) in table().iter().enumerate() {
        // Both at once, on prefixes of their own.
        let (go, ours) = std::thread::scope(|s| {
            let go = s.spawn(|| run_case(Impl::Go, agent, case, index));
            let ours = s.spawn(|| run_case(Impl::Ours, agent, case, index));
            (go.join().unwrap(), ours.join().unwrap())
        });
        let expected = match case.differs {
            None => Outcome {
                code: go.0.code,
                ..go.0
            },
            Some((difference, code)) => {
                if !readme.contains(&format!("| {difference} |")) {
                    failures.push(format!(
                        "the difference {difference:?} of case {:?} is not in cli/README.md's table",
                        case.name
                    ));
                }
                Outcome {
                    code: Some(code),
                    ..go.0
                }
            }
        };
        if ours.0 != expected {
            failures.push(format!(
                "case {:?}: expected {expected:?}\n{}\n{}",
                case.name, go.1, ours.1
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn top_level_go_spellings_work() {
    let Some(agent) = require_agent() else { return };
    for flag in ["-version", "--version", "-help"] {
        for which in [Impl::Go, Impl::Ours] {
            let mut c = match which {
                Impl::Go => Command::new(agent.binary()),
                Impl::Ours => Command::new(bin()),
            };
            let output = c.arg(flag).stdin(Stdio::null()).output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(output.status.code(), Some(0), "{which:?} {flag}: {text}");
            assert!(!text.contains("unexpected argument"), "{which:?} {flag}: {text}");
        }
    }
}
