//! The child process: how it is started, and how signals reach it.
//!
//! Signals are sent with the `kill` system call (through `rustix`, as the workspace forbids
//! `unsafe`). A signal is sent only while the child has not been reaped (tokio's `Child::id` is
//! `Some` until then), so its process id can't have been reused.
//!
//! The child gets a process group of its own, so that the signals sent on lock loss reach
//! everything it started (a shell's children too), not only its first process; a signal
//! consul-lock receives is passed on to that group. The exception is a child that shares the
//! terminal's input (`--pass-stdin` from a terminal): it stays in consul-lock's group (as under
//! Go's `consul lock`), since a background group that reads the terminal would be stopped.

use std::io::IsTerminal as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};

use consul_lock_tokio::FencingToken;

/// How to start the child.
#[derive(Debug)]
pub(crate) struct Spec<'a> {
    /// The command line after the prefix.
    pub(crate) argv: &'a [String],
    /// Through `$SHELL -c` (or `/bin/sh -c`), with the words joined by spaces, as Go does.
    pub(crate) shell: bool,
    /// Inherit standard input (else `/dev/null`).
    pub(crate) pass_stdin: bool,
}

/// A running child.
#[derive(Debug)]
pub(crate) struct Running {
    /// The process.
    pub(crate) child: tokio::process::Child,
    /// Whether it leads a process group of its own (then signals go to the group).
    pub(crate) own_group: bool,
}

/// Starts the child with the lock's environment.
pub(crate) fn spawn(spec: &Spec<'_>, token: &FencingToken) -> std::io::Result<Running> {
    let mut command = if spec.shell {
        let shell = std::env::var_os("SHELL")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".into());
        let mut c = tokio::process::Command::new(shell);
        c.arg("-c").arg(spec.argv.join(" "));
        c
    } else {
        let mut c = tokio::process::Command::new(&spec.argv[0]);
        c.args(&spec.argv[1..]);
        c
    };
    command
        .env("CONSUL_LOCK_HELD", "true")
        .env("CONSUL_LOCK_KEY", token.key.as_str())
        .env("CONSUL_LOCK_SESSION", token.session.as_str())
        .env("CONSUL_LOCK_INDEX", token.lock_index.to_string())
        .env("CONSUL_LOCK_SEQUENCE", token.sequence().to_string())
        .stdin(if spec.pass_stdin {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let own_group = !(spec.pass_stdin && std::io::stdin().is_terminal());
    if own_group {
        command.process_group(0);
    }
    Ok(Running {
        child: command.spawn()?,
        own_group,
    })
}

/// A signal consul-lock sends to the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sig {
    /// SIGHUP.
    Hup,
    /// SIGINT.
    Int,
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
}

impl Sig {
    /// `HUP`, `INT`, `TERM`, `KILL`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sig::Hup => "HUP",
            Sig::Int => "INT",
            Sig::Term => "TERM",
            Sig::Kill => "KILL",
        }
    }

    fn raw(self) -> rustix::process::Signal {
        use rustix::process::Signal;
        match self {
            Sig::Hup => Signal::HUP,
            Sig::Int => Signal::INT,
            Sig::Term => Signal::TERM,
            Sig::Kill => Signal::KILL,
        }
    }
}

impl Running {
    /// Sends `signal` to the child (its group, when it has one). Does nothing once the child has
    /// been reaped.
    pub(crate) fn signal(&self, signal: Sig) -> std::io::Result<()> {
        let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            return Ok(());
        };
        let sent = if self.own_group {
            rustix::process::kill_process_group(pid, signal.raw())
        } else {
            rustix::process::kill_process(pid, signal.raw())
        };
        sent.map_err(std::io::Error::from)
    }
}

/// How a child ended, for events and exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exit {
    /// The exit code, when it exited.
    pub(crate) code: Option<i32>,
    /// The signal that killed it, when one did.
    pub(crate) signal: Option<i32>,
}

impl Exit {
    /// From the process status.
    pub(crate) fn from_status(status: ExitStatus) -> Exit {
        Exit {
            code: status.code(),
            signal: status.signal(),
        }
    }

    /// Whether it failed (as Go's `cmd.Wait` sees it: a non-zero exit, or a signal).
    pub(crate) fn failed(self) -> bool {
        self.code != Some(0)
    }

    /// `exit code 3`, `killed by signal 15 (SIGTERM)`.
    pub(crate) fn describe(self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}{}", signal_name(signal)),
            (None, None) => "ended (status unknown)".to_owned(),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        9 => " (SIGKILL)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use consul_lock_core::api::{Key, SessionId};

    fn token() -> FencingToken {
        FencingToken {
            key: Key::new("svc/x/.lock").unwrap(),
            session: SessionId::new("5e1c3c3a-0000-4000-8000-000000000001").unwrap(),
            lock_index: 4,
            modify_index: 77,
        }
    }

    #[tokio::test]
    async fn the_child_sees_the_token_and_a_signal_reaches_its_group() {
        let argv = [
            "trap 'exit 7' TERM; [ \"$CONSUL_LOCK_HELD $CONSUL_LOCK_INDEX $CONSUL_LOCK_SEQUENCE $CONSUL_LOCK_KEY\" = \
             'true 4 77 svc/x/.lock' ] || exit 1; while :; do sleep 0.05; done"
                .to_owned(),
        ];
        let spec = Spec {
            argv: &argv,
            shell: true,
            pass_stdin: false,
        };
        let mut running = spawn(&spec, &token()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        running.signal(Sig::Term).unwrap();
        let status = running.child.wait().await.unwrap();
        let exit = Exit::from_status(status);
        assert!(exit.failed());
        // 7: the environment was right and the shell got SIGTERM (15: it got it before its trap).
        assert!(exit.code == Some(7) || exit.signal == Some(15), "{exit:?}");
        assert!(
            running.signal(Sig::Kill).is_ok(),
            "a reaped child is not signalled"
        );
    }

    #[tokio::test]
    async fn without_a_shell_argv_runs_as_is() {
        let argv = [
            "sh".to_owned(),
            "-c".to_owned(),
            "exit $CONSUL_LOCK_INDEX".to_owned(),
        ];
        let spec = Spec {
            argv: &argv,
            shell: false,
            pass_stdin: false,
        };
        let mut running = spawn(&spec, &token()).unwrap();
        let exit = Exit::from_status(running.child.wait().await.unwrap());
        assert_eq!(exit.code, Some(4));
        assert_eq!(exit.describe(), "exit code 4");
    }
}
