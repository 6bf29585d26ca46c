//! Go's flag syntax, as `consul lock` takes it, rewritten into the double-dash form clap reads.
//!
//! Go's `flag` package (what every `consul` subcommand uses) knows only long flags, spelt with
//! one dash or two: `-timeout=1s`, `--timeout=1s`, `-timeout 1s`; a boolean is `-verbose` or
//! `-verbose=false` (never `-verbose false`); the last of repeated flags wins. Parsing stops at
//! the first argument that is not a flag (for `consul lock`, the prefix: everything after it is
//! the child's), or after `--`. So `-vn` is the flag named `vn`, never `-v -n`.
//!
//! [`normalize`] reads the arguments of a subcommand that way, with the flags that clap knows for
//! it (their long names, aliases, and one-letter short names such as `-n`), and writes each as
//! `--long=value`. For `run` it ends the flags with `--` before the prefix, so clap can't read
//! the prefix or the child as options. The other subcommands keep clap's freedom of order
//! (`status <key> -json`), with the same flag spellings.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::OnceLock;

use clap::CommandFactory as _;

use crate::Failure;
use crate::cli::Cli;

/// How a flag takes its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// A switch: `-verbose`, `-verbose=false`.
    Switch,
    /// A boolean with a value clap reads (`--shell=false`), also given as `-shell`.
    Bool,
    /// A value: `-timeout=1s` or `-timeout 1s`.
    Value,
}

/// One flag of a subcommand.
#[derive(Clone, Debug)]
struct Flag {
    /// The long name clap knows it by.
    long: String,
    /// The names it may be given by (long names, aliases, the short letter).
    names: Vec<String>,
    shape: Shape,
}

/// The flags clap defines for `subcommand`.
fn flags_of(subcommand: &str) -> Option<Vec<Flag>> {
    let mut command = Cli::command();
    command.build();
    let sub = command.find_subcommand(subcommand)?;
    let mut flags = Vec::new();
    for arg in sub.get_arguments() {
        if arg.is_positional() {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let mut names: Vec<String> = vec![long.to_owned()];
        names.extend(
            arg.get_all_aliases()
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned),
        );
        if let Some(short) = arg.get_short() {
            names.push(short.to_string());
        }
        let shape = if !arg.get_action().takes_values() {
            Shape::Switch
        } else if arg.get_num_args().is_some_and(|n| n.min_values() == 0) {
            Shape::Bool
        } else {
            Shape::Value
        };
        flags.push(Flag {
            long: long.to_owned(),
            names,
            shape,
        });
    }
    Some(flags)
}

/// How the user spelt each flag given (by its long name), for messages.
static TYPED: OnceLock<HashMap<String, String>> = OnceLock::new();

/// The flag with the long name `long` as the user typed it (`-timeout`, `-try`, `--timeout`), or
/// `--long` when it was not given.
pub(crate) fn typed(long: &str) -> String {
    TYPED
        .get()
        .and_then(|typed| typed.get(long).cloned())
        .unwrap_or_else(|| format!("--{long}"))
}

/// Whether the command line asks for `--json` among its options (before the first operand),
/// read before it is known to parse: a usage error is then reported as JSON too.
pub(crate) fn wants_json(args: &[OsString]) -> bool {
    let mut json = false;
    for arg in args.iter().skip(2) {
        let Some(text) = arg.to_str() else { break };
        if text == "--" || !text.starts_with('-') {
            break;
        }
        let body = text.trim_start_matches('-');
        match body.split_once('=') {
            Some(("json", value)) => json = parse_bool(value).unwrap_or(json),
            None if body == "json" => json = true,
            _ => {}
        }
    }
    json
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// `args` (the whole command line, program name first) with the subcommand's flags read as Go
/// reads them and written as clap reads them. A command line without a known subcommand is left
/// as it is, for clap to explain.
pub(crate) fn normalize(mut args: Vec<OsString>) -> Result<Vec<OsString>, Failure> {
    let Some(subcommand) = args.get(1).and_then(|a| a.to_str()).map(str::to_owned) else {
        return Ok(args);
    };
    // `consul -version`, `consul -help`: Go's spellings of the top-level flags.
    if let Some(long) = ["-version", "-help"].iter().find(|f| **f == subcommand) {
        args[1] = format!("-{long}").into();
        return Ok(args);
    }
    let Some(flags) = flags_of(&subcommand) else {
        return Ok(args);
    };
    let stop_at_first_operand = subcommand == "run";
    let usage =
        |message: String| Failure::usage(format!("{message} (see `consul-lock {subcommand} --help`)"));

    let mut typed = HashMap::new();
    let mut out: Vec<OsString> = args[..2].to_vec();
    let mut operands: Vec<OsString> = Vec::new();
    let mut rest = args.into_iter().skip(2);
    while let Some(arg) = rest.next() {
        let Some(text) = arg.to_str().map(str::to_owned) else {
            if arg.as_encoded_bytes().starts_with(b"-") {
                return Err(usage(format!("the flag {arg:?} is not valid UTF-8")));
            }
            operands.push(arg);
            if stop_at_first_operand {
                break;
            }
            continue;
        };
        if text == "--" {
            break;
        }
        if !text.starts_with('-') || text == "-" {
            operands.push(arg);
            if stop_at_first_operand {
                break;
            }
            continue;
        }
        let body = text.strip_prefix("--").unwrap_or(&text[1..]);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(usage(format!("bad flag syntax: {text}")));
        }
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        let Some(flag) = flags.iter().find(|f| f.names.iter().any(|n| n == name)) else {
            return Err(usage(format!("flag provided but not defined: -{name}")));
        };
        let long = &flag.long;
        let dashes = if text.starts_with("--") { "--" } else { "-" };
        typed.insert(long.clone(), format!("{dashes}{name}"));
        match flag.shape {
            Shape::Switch | Shape::Bool => {
                let on = match &value {
                    None => true,
                    Some(v) => parse_bool(v).ok_or_else(|| {
                        usage(format!(
                            "invalid boolean value {v:?} for -{name}: use -{name} or -{name}=false"
                        ))
                    })?,
                };
                // The last one wins, as in Go.
                let switch = format!("--{long}");
                let valued = format!("--{long}=");
                out.retain(|o| o.to_str().is_none_or(|o| o != switch && !o.starts_with(&valued)));
                if flag.shape == Shape::Bool {
                    out.push(format!("--{long}={on}").into());
                } else if on {
                    out.push(switch.into());
                }
            }
            Shape::Value => {
                let value = match value {
                    Some(v) => v.into(),
                    None => rest
                        .next()
                        .ok_or_else(|| usage(format!("flag needs an argument: -{name}")))?,
                };
                let mut pair = OsString::from(format!("--{long}="));
                pair.push(value);
                out.push(pair);
            }
        }
    }
    out.push("--".into());
    out.extend(operands);
    let mut rest = rest.peekable();
    // `run <prefix> -- <child...>`, consul-lock's documented form: that `--` only marks where the
    // child starts. (Go would hand it to the child, which then fails.)
    if stop_at_first_operand && rest.peek().is_some_and(|a| a == "--") {
        rest.next();
    }
    out.extend(rest);
    let _ = TYPED.set(typed);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Result<Vec<String>, String> {
        let args = std::iter::once("consul-lock")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        normalize(args)
            .map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
            .map_err(|f| f.message)
    }

    #[test]
    fn go_spellings_become_clap_spellings() {
        assert_eq!(
            norm(&[
                "run",
                "-timeout=1s",
                "-n",
                "3",
                "--name=x",
                "-shell=false",
                "-verbose",
                "p",
                "c",
                "-x"
            ])
            .unwrap(),
            [
                "consul-lock",
                "run",
                "--timeout=1s",
                "--limit=3",
                "--name=x",
                "--shell=false",
                "--verbose",
                "--",
                "p",
                "c",
                "-x"
            ]
        );
        assert_eq!(
            norm(&["run", "-http-addr=127.0.0.1:1", "-token", "t", "p", "c"]).unwrap(),
            [
                "consul-lock",
                "run",
                "--http-addr=127.0.0.1:1",
                "--token=t",
                "--",
                "p",
                "c"
            ]
        );
        // Parsing stops at the prefix: the child's flags are its own.
        assert_eq!(
            norm(&["run", "p", "-verbose", "--", "x"]).unwrap(),
            ["consul-lock", "run", "--", "p", "-verbose", "--", "x"]
        );
        // A `--` right after the prefix only marks the child's start.
        assert_eq!(
            norm(&["run", "-n=2", "p", "--", "x", "--", "y"]).unwrap(),
            ["consul-lock", "run", "--limit=2", "--", "p", "x", "--", "y"]
        );
        assert_eq!(
            norm(&[
                "run",
                "-verbose=true",
                "-verbose=false",
                "-try",
                "5s",
                "--",
                "p",
                "c"
            ])
            .unwrap(),
            ["consul-lock", "run", "--timeout=5s", "--", "p", "c"]
        );
        // A value may start with a dash.
        assert_eq!(
            norm(&["run", "-name", "-x-", "p", "c"]).unwrap(),
            ["consul-lock", "run", "--name=-x-", "--", "p", "c"]
        );
        // Other subcommands keep flags after the operand.
        assert_eq!(
            norm(&["status", "svc/x", "-json", "-http-addr", "h:1"]).unwrap(),
            [
                "consul-lock",
                "status",
                "--json",
                "--http-addr=h:1",
                "--",
                "svc/x"
            ]
        );
    }

    #[test]
    fn no_clusters_and_no_unknown_flags() {
        let e = norm(&["run", "-vn", "p", "c"]).unwrap_err();
        assert!(e.contains("flag provided but not defined: -vn"), "{e}");
        let e = norm(&["run", "-verbose", "-bogus=1", "p", "c"]).unwrap_err();
        assert!(e.contains("-bogus"), "{e}");
        let e = norm(&["run", "-shell=maybe", "p", "c"]).unwrap_err();
        assert!(e.contains("invalid boolean value \"maybe\" for -shell"), "{e}");
        let e = norm(&["run", "-timeout"]).unwrap_err();
        assert!(e.contains("flag needs an argument: -timeout"), "{e}");
        let e = norm(&["run", "---x", "p", "c"]).unwrap_err();
        assert!(e.contains("bad flag syntax"), "{e}");
    }

    #[test]
    fn unknown_subcommands_are_left_to_clap() {
        assert_eq!(norm(&["--version"]).unwrap(), ["consul-lock", "--version"]);
        assert_eq!(norm(&["-version"]).unwrap(), ["consul-lock", "--version"]);
        assert_eq!(norm(&["nope", "-x"]).unwrap(), ["consul-lock", "nope", "-x"]);
    }
}
