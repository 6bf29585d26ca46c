//! What an observer's reports ([`ObserveEvent`]s of core's `ObserverMachine`) keep, whatever the
//! agent does: checked by the core's generated test of the machine alone and by the simulator's,
//! on the whole run's reports.

use consul_lock_core::machine::ObserveEvent;

/// Checks `events`, in the order reported:
/// - a new leader's sequence is strictly above the last leader's;
/// - a value report is the current leader's (its session, `LockIndex` and sequence);
/// - no leader, value or no-leader report twice in a row;
/// - `Blind` and `Resumed` alternate, starting with `Blind`;
/// - no `Failed` (the runs checked never refuse reads for good).
///
/// The first broken rule, with the report's place, as the error.
pub fn check_reports(events: &[ObserveEvent]) -> Result<(), String> {
    let mut last_sequence = 0;
    let mut leader = None;
    let mut blind = false;
    let mut previous: Option<&ObserveEvent> = None;
    for (i, e) in events.iter().enumerate() {
        match e {
            ObserveEvent::Leader(l) => {
                if l.sequence <= last_sequence {
                    return Err(format!(
                        "report {i}: leader sequence {} after {last_sequence}",
                        l.sequence
                    ));
                }
                last_sequence = l.sequence;
                leader = Some((l.session.clone(), l.lock_index, l.sequence));
            }
            ObserveEvent::Value(l) => {
                if leader != Some((l.session.clone(), l.lock_index, l.sequence)) {
                    return Err(format!(
                        "report {i}: a value of another leader than {leader:?}: {l:?}"
                    ));
                }
            }
            ObserveEvent::NoLeader { .. } => leader = None,
            ObserveEvent::Blind { .. } | ObserveEvent::Resumed { .. } => {
                let blinding = matches!(e, ObserveEvent::Blind { .. });
                if blinding == blind {
                    return Err(format!("report {i}: {e:?} while blind={blind}"));
                }
                blind = blinding;
                continue;
            }
            ObserveEvent::Failed(why) => return Err(format!("report {i}: failed: {why}")),
        }
        if previous == Some(e) {
            return Err(format!("report {i}: reported twice: {e:?}"));
        }
        previous = Some(e);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use consul_lock_core::api::{Key, SessionId};
    use consul_lock_core::machine::Leader;

    use super::*;

    fn leader(session: &str, sequence: u64, value: &str) -> Leader {
        Leader {
            key: Key::new("k").unwrap(),
            session: SessionId::new(session).unwrap(),
            node: None,
            session_name: None,
            value: value.as_bytes().to_vec(),
            lock_index: 1,
            sequence,
            since: Instant::now(),
        }
    }

    #[test]
    fn each_rule_is_checked() {
        let since = Instant::now();
        let blind = ObserveEvent::Blind {
            since,
            unseen_for: Duration::from_secs(10),
            last: "refused".to_owned(),
        };
        let resumed = ObserveEvent::Resumed {
            unseen_for: Duration::from_secs(11),
        };
        let a = leader("a", 5, "x");
        let good = [
            ObserveEvent::NoLeader { since },
            ObserveEvent::Leader(a.clone()),
            ObserveEvent::Value(leader("a", 5, "y")),
            blind.clone(),
            resumed.clone(),
            ObserveEvent::Leader(leader("b", 9, "z")),
        ];
        assert_eq!(check_reports(&good), Ok(()));
        let backwards = [
            ObserveEvent::Leader(a.clone()),
            ObserveEvent::Leader(leader("b", 4, "z")),
        ];
        assert!(check_reports(&backwards).is_err());
        let foreign_value = [
            ObserveEvent::Leader(a.clone()),
            ObserveEvent::Value(leader("b", 5, "y")),
        ];
        assert!(check_reports(&foreign_value).is_err());
        let twice = [ObserveEvent::NoLeader { since }, ObserveEvent::NoLeader { since }];
        assert!(check_reports(&twice).is_err());
        assert!(check_reports(&[resumed]).is_err());
        assert!(check_reports(&[blind.clone(), blind]).is_err());
    }
}
