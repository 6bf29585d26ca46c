//! `RUST_LOG`: the library's `tracing` events on standard error, filtered as `env_logger` and
//! `tracing-subscriber` read the variable's common forms: `debug`, `consul_lock_core=trace`,
//! `warn,consul_lock_tokio=debug` (the most specific target prefix wins; `off` silences). Spans
//! are not tracked: the library logs events only. Nothing is installed when `RUST_LOG` is unset
//! or empty, and a directive that does not parse is reported once and skipped.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One directive: a target prefix (none: every target) and the most verbose level let through
/// (`None`: off).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Directive {
    target: Option<String>,
    level: Option<Level>,
}

/// The filter and printer.
#[derive(Debug)]
struct StderrLog {
    directives: Vec<Directive>,
}

fn parse_level(text: &str) -> Result<Option<Level>, ()> {
    match text.to_ascii_lowercase().as_str() {
        "off" => Ok(None),
        "error" => Ok(Some(Level::ERROR)),
        "warn" => Ok(Some(Level::WARN)),
        "info" => Ok(Some(Level::INFO)),
        "debug" => Ok(Some(Level::DEBUG)),
        "trace" => Ok(Some(Level::TRACE)),
        _ => Err(()),
    }
}

/// The directives of `spec`, and the parts that did not parse.
fn parse(spec: &str) -> (Vec<Directive>, Vec<String>) {
    let mut directives = Vec::new();
    let mut bad = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let directive = match part.split_once('=') {
            Some((target, level)) => parse_level(level).map(|level| Directive {
                target: Some(target.to_owned()),
                level,
            }),
            None => match parse_level(part) {
                Ok(level) => Ok(Directive { target: None, level }),
                // A bare target means everything from it.
                Err(()) if part.chars().all(|c| c.is_alphanumeric() || c == '_' || c == ':') => {
                    Ok(Directive {
                        target: Some(part.to_owned()),
                        level: Some(Level::TRACE),
                    })
                }
                Err(()) => Err(()),
            },
        };
        match directive {
            Ok(d) => directives.push(d),
            Err(()) => bad.push(part.to_owned()),
        }
    }
    (directives, bad)
}

impl StderrLog {
    fn allows(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        let best = self
            .directives
            .iter()
            .filter(|d| d.target.as_deref().is_none_or(|t| target.starts_with(t)))
            .max_by_key(|d| d.target.as_ref().map_or(0, |t| t.len() + 1));
        best.and_then(|d| d.level)
            .is_some_and(|level| *metadata.level() <= level)
    }
}

/// Writes an event's fields as `message key=value ...`.
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.allows(metadata)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        crate::out::info(&format!(
            "{} {} {}:{}",
            crate::out::clock(),
            metadata.level(),
            metadata.target(),
            fields.0
        ));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Installs the stderr log when `RUST_LOG` asks for one.
pub(crate) fn init() {
    let Some(spec) = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty()) else {
        return;
    };
    let (directives, bad) = parse(&spec);
    for part in bad {
        crate::out::info(&format!(
            "RUST_LOG: {part:?} is not a level (off, error, warn, info, debug, trace) or \
             target=level; skipped"
        ));
    }
    let _ = tracing::subscriber::set_global_default(StderrLog { directives });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives() {
        let (d, bad) = parse("warn, consul_lock_core=debug,nonsense=loud,consul_lock_tokio");
        assert_eq!(bad, ["nonsense=loud"]);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[0],
            Directive {
                target: None,
                level: Some(Level::WARN)
            }
        );
        assert_eq!(d[1].level, Some(Level::DEBUG));
        assert_eq!(d[2].level, Some(Level::TRACE));
        let (d, _) = parse("off");
        assert_eq!(
            d,
            [Directive {
                target: None,
                level: None
            }]
        );
    }
}
