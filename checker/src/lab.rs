//! The reliability lab's verdict: what contenders of a lock on a real, faulted Consul cluster
//! believed and wrote, checked against a fenced register.
//!
//! The lab logs every belief ("I hold" with the fencing token's sequence, "I lost", "I
//! released") and every write to the protected resource, each stamped with the one clock of the
//! machine, and every fault it injected with its start and heal. [`check`] then replays the
//! writes, in the order they were made, into a [`FencedRegister`] per lock, and reports, per lock
//! (group) and fault kind:
//! - **overlap**: two contenders of one lock believing they hold it at the same moment (count and
//!   total duration);
//! - **stale writes refused**: writes the register turned away because it had already seen a
//!   higher sequence, which is fencing doing its job;
//! - **stale writes accepted**: writes the register took although a higher sequence had already
//!   been granted (the new holder just had not written yet): what fencing cannot stop, and what a
//!   safe lock never lets happen, since its old holder stops believing before a new one is granted;
//! - **sequence regressions**: a grant whose sequence is not above every earlier grant's;
//! - **time to a new holder** after each fault heals (0 when someone holds at the heal);
//! - **unexplained losses**: "I lost" outside every fault window (with its grace).
//!
//! Everything here is pure: the records in, a report out.

use std::collections::BTreeMap;

/// What one contender reported, as the lab logged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Belief {
    /// It holds the lock, with this fencing sequence (0: the client could not tell).
    Held {
        /// The grant's sequence.
        seq: u64,
    },
    /// It wrote to the protected resource with this sequence, believing it still held.
    Write {
        /// The sequence written with.
        seq: u64,
    },
    /// Its client told it the lock was lost.
    Lost,
    /// It began to release the lock of its own accord (the end of its belief).
    Released,
}

/// One line of the lab's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The lock (one per client under test: tokio, blocking, go).
    pub group: String,
    /// The contender, unique within the run.
    pub contender: u64,
    /// When, in nanoseconds of the machine's one clock.
    pub t_ns: u64,
    /// What.
    pub belief: Belief,
}

/// One injected fault: its kind and when it began and healed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultWindow {
    /// The fault kind's name (a table row).
    pub kind: String,
    /// When it was injected.
    pub start_ns: u64,
    /// When it was healed.
    pub heal_ns: u64,
}

/// A register that refuses a write whose sequence is below the highest it has seen, as a
/// fenced storage service does (and a write of an equal sequence from another writer, so that
/// two grants that wrongly share a sequence cannot both write).
#[derive(Clone, Debug, Default)]
pub struct FencedRegister {
    highest: Option<(u64, u64)>,
}

impl FencedRegister {
    /// An empty register.
    pub fn new() -> FencedRegister {
        FencedRegister::default()
    }

    /// Offers a write by `writer` with `seq`; `true` if the register takes it.
    pub fn write(&mut self, writer: u64, seq: u64) -> bool {
        let take = match self.highest {
            None => true,
            Some((high, by)) => seq > high || (seq == high && writer == by),
        };
        if take {
            self.highest = Some((seq, writer));
        }
        take
    }

    /// The highest sequence taken so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest.map(|(seq, _)| seq)
    }
}

/// The figures of one lock under one fault kind (or with no fault: [`NO_FAULT`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// Faults of this kind injected.
    pub faults: usize,
    /// Grants (`held` beliefs) made.
    pub grants: usize,
    /// Pairs of belief intervals that overlapped.
    pub overlaps: usize,
    /// Their total overlapping time.
    pub overlap_ns: u64,
    /// Writes in all.
    pub writes: usize,
    /// Writes the register refused (below its highest sequence).
    pub stale_refused: usize,
    /// Writes the register took although a higher sequence had already been granted.
    pub stale_accepted: usize,
    /// Grants whose sequence was not above every earlier grant's.
    pub seq_regressions: usize,
    /// Grants whose sequence the client could not tell (0).
    pub seq_unknown: usize,
    /// Time from each heal to the next holder (0 when someone held at the heal).
    pub time_to_holder_ns: Vec<u64>,
    /// Faults after whose heal nobody held again before the next fault (or the end).
    pub no_holder_after_heal: usize,
    /// Losses outside every fault window.
    pub unexplained_losses: usize,
    /// Losses in all.
    pub losses: usize,
}

/// The row name of what happened outside every fault window.
pub const NO_FAULT: &str = "no fault";

/// The report: one [`Row`] per (group, fault kind).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Keyed by (group, fault kind).
    pub rows: BTreeMap<(String, String), Row>,
}

impl Report {
    /// The sum of a group's rows (its run as a whole).
    pub fn total(&self, group: &str) -> Row {
        let mut total = Row::default();
        for ((g, _), row) in &self.rows {
            if g != group {
                continue;
            }
            total.faults += row.faults;
            total.grants += row.grants;
            total.overlaps += row.overlaps;
            total.overlap_ns += row.overlap_ns;
            total.writes += row.writes;
            total.stale_refused += row.stale_refused;
            total.stale_accepted += row.stale_accepted;
            total.seq_regressions += row.seq_regressions;
            total.seq_unknown += row.seq_unknown;
            total.time_to_holder_ns.extend(&row.time_to_holder_ns);
            total.no_holder_after_heal += row.no_holder_after_heal;
            total.unexplained_losses += row.unexplained_losses;
            total.losses += row.losses;
        }
        total
    }

    /// The groups seen, in order.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.rows.keys().map(|(g, _)| g.clone()).collect();
        groups.dedup();
        groups
    }
}

/// A belief interval: a contender's hold from its grant to its loss or release (or the end).
#[derive(Clone, Copy, Debug)]
struct Hold {
    contender: u64,
    start: u64,
    end: u64,
}

/// Checks the log. `grace_ns` extends each fault window past its heal: a loss or an overlap that
/// far after the heal still counts against the fault (a session invalidated during the fault is
/// noticed a little later). `end_ns` closes the holds still open when the run ended.
pub fn check(records: &[Record], faults: &[FaultWindow], grace_ns: u64, end_ns: u64) -> Report {
    let mut report = Report::default();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| r.t_ns);
    let mut groups: Vec<&str> = sorted.iter().map(|r| r.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    let window_of = |t: u64| -> &str {
        faults
            .iter()
            .rfind(|f| f.start_ns <= t && t <= f.heal_ns.saturating_add(grace_ns))
            .map_or(NO_FAULT, |f| f.kind.as_str())
    };
    for group in groups {
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for fault in faults {
            rows.entry(fault.kind.clone()).or_default().faults += 1;
        }
        rows.entry(NO_FAULT.to_owned()).or_default();
        let mut register = FencedRegister::new();
        let mut highest_grant: Option<u64> = None;
        let mut open: BTreeMap<u64, u64> = BTreeMap::new();
        let mut holds: Vec<Hold> = Vec::new();
        for record in sorted.iter().filter(|r| r.group == group) {
            let here = rows.entry(window_of(record.t_ns).to_owned()).or_default();
            match record.belief {
                Belief::Held { seq } => {
                    here.grants += 1;
                    if seq == 0 {
                        here.seq_unknown += 1;
                    } else {
                        if highest_grant.is_some_and(|high| seq <= high) {
                            here.seq_regressions += 1;
                        }
                        highest_grant = Some(highest_grant.map_or(seq, |high| high.max(seq)));
                    }
                    open.insert(record.contender, record.t_ns);
                }
                Belief::Write { seq } => {
                    here.writes += 1;
                    if !register.write(record.contender, seq) {
                        here.stale_refused += 1;
                    } else if highest_grant.is_some_and(|high| seq < high) {
                        here.stale_accepted += 1;
                    }
                }
                Belief::Lost | Belief::Released => {
                    if record.belief == Belief::Lost {
                        here.losses += 1;
                        if window_of(record.t_ns) == NO_FAULT {
                            here.unexplained_losses += 1;
                        }
                    }
                    if let Some(start) = open.remove(&record.contender) {
                        holds.push(Hold {
                            contender: record.contender,
                            start,
                            end: record.t_ns,
                        });
                    }
                }
            }
        }
        for (contender, start) in open {
            holds.push(Hold {
                contender,
                start,
                end: end_ns.max(start),
            });
        }
        holds.sort_by_key(|h| h.start);
        for (i, a) in holds.iter().enumerate() {
            for b in &holds[i + 1..] {
                if b.start >= a.end {
                    break;
                }
                if a.contender == b.contender {
                    continue;
                }
                let overlap = a.end.min(b.end) - b.start;
                let here = rows.entry(window_of(b.start).to_owned()).or_default();
                here.overlaps += 1;
                here.overlap_ns += overlap;
            }
        }
        for (n, fault) in faults.iter().enumerate() {
            let until = faults.get(n + 1).map_or(end_ns, |next| next.start_ns);
            let here = rows.entry(fault.kind.clone()).or_default();
            if holds
                .iter()
                .any(|h| h.start <= fault.heal_ns && h.end > fault.heal_ns)
            {
                here.time_to_holder_ns.push(0);
            } else if let Some(next) = holds
                .iter()
                .map(|h| h.start)
                .filter(|&start| start > fault.heal_ns && start < until)
                .min()
            {
                here.time_to_holder_ns.push(next - fault.heal_ns);
            } else {
                here.no_holder_after_heal += 1;
            }
        }
        for (kind, row) in rows {
            report.rows.insert((group.to_owned(), kind), row);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rec(contender: u64, t_s: u64, belief: Belief) -> Record {
        Record {
            group: "tokio".to_owned(),
            contender,
            t_ns: t_s * S,
            belief,
        }
    }

    fn fault(kind: &str, start_s: u64, heal_s: u64) -> FaultWindow {
        FaultWindow {
            kind: kind.to_owned(),
            start_ns: start_s * S,
            heal_ns: heal_s * S,
        }
    }

    #[test]
    fn the_register_refuses_lower_sequences_and_an_equal_one_from_another_writer() {
        let mut register = FencedRegister::new();
        assert!(register.write(1, 10));
        assert!(register.write(1, 10));
        assert!(!register.write(2, 10));
        assert!(!register.write(2, 9));
        assert!(register.write(2, 11));
        assert!(!register.write(1, 10));
        assert_eq!(register.highest(), Some(11));
    }

    #[test]
    fn a_clean_handoff_has_no_overlap_and_no_stale_write() {
        let records = [
            rec(1, 1, Belief::Held { seq: 5 }),
            rec(1, 2, Belief::Write { seq: 5 }),
            rec(1, 3, Belief::Released),
            rec(2, 4, Belief::Held { seq: 8 }),
            rec(2, 5, Belief::Write { seq: 8 }),
        ];
        let report = check(&records, &[], 0, 10 * S);
        let row = report.total("tokio");
        assert_eq!(row.grants, 2);
        assert_eq!(row.writes, 2);
        assert_eq!(
            (
                row.overlaps,
                row.stale_refused,
                row.stale_accepted,
                row.seq_regressions
            ),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn a_partitioned_holder_that_keeps_believing_overlaps_and_its_late_writes_are_told_apart() {
        // Contender 1 holds with 5 and is cut off at 10 s; contender 2 gets 9 at 30 s while 1
        // still believes. 1 writes at 31 s before 2's first write (accepted, stale) and at 33 s
        // after it (refused). 1 notices at 40 s.
        let records = [
            rec(1, 1, Belief::Held { seq: 5 }),
            rec(2, 30, Belief::Held { seq: 9 }),
            rec(1, 31, Belief::Write { seq: 5 }),
            rec(2, 32, Belief::Write { seq: 9 }),
            rec(1, 33, Belief::Write { seq: 5 }),
            rec(1, 40, Belief::Lost),
        ];
        let faults = [fault("cut-client", 10, 35)];
        let report = check(&records, &faults, 10 * S, 50 * S);
        let row = &report.rows[&("tokio".to_owned(), "cut-client".to_owned())];
        assert_eq!(row.faults, 1);
        assert_eq!(row.overlaps, 1);
        assert_eq!(row.overlap_ns, 10 * S);
        assert_eq!(row.stale_accepted, 1);
        assert_eq!(row.stale_refused, 1);
        assert_eq!(row.losses, 1);
        assert_eq!(row.unexplained_losses, 0);
        assert_eq!(row.time_to_holder_ns, vec![0]);
    }

    #[test]
    fn sequences_that_go_backwards_or_repeat_are_counted_and_zero_is_unknown() {
        let records = [
            rec(1, 1, Belief::Held { seq: 5 }),
            rec(1, 2, Belief::Released),
            rec(2, 3, Belief::Held { seq: 5 }),
            rec(2, 4, Belief::Released),
            rec(3, 5, Belief::Held { seq: 4 }),
            rec(3, 6, Belief::Released),
            rec(4, 7, Belief::Held { seq: 0 }),
        ];
        let row = check(&records, &[], 0, 10 * S).total("tokio");
        assert_eq!(row.seq_regressions, 2);
        assert_eq!(row.seq_unknown, 1);
        assert_eq!(row.overlaps, 0);
    }

    #[test]
    fn a_loss_outside_every_fault_window_is_unexplained_and_the_time_to_a_holder_is_measured() {
        let records = [
            rec(1, 1, Belief::Held { seq: 5 }),
            rec(1, 12, Belief::Lost),
            rec(2, 25, Belief::Held { seq: 7 }),
            rec(2, 60, Belief::Lost),
        ];
        let faults = [fault("pause-client", 10, 20)];
        let report = check(&records, &faults, 5 * S, 100 * S);
        let faulted = &report.rows[&("tokio".to_owned(), "pause-client".to_owned())];
        assert_eq!((faulted.losses, faulted.unexplained_losses), (1, 0));
        assert_eq!(faulted.time_to_holder_ns, vec![5 * S]);
        let calm = &report.rows[&("tokio".to_owned(), NO_FAULT.to_owned())];
        assert_eq!((calm.losses, calm.unexplained_losses), (1, 1));
    }

    #[test]
    fn a_fault_after_which_nobody_holds_again_is_counted() {
        let records = [rec(1, 1, Belief::Held { seq: 5 }), rec(1, 12, Belief::Lost)];
        let faults = [fault("isolate-leader", 10, 20), fault("isolate-leader", 40, 50)];
        let row =
            &check(&records, &faults, 0, 100 * S).rows[&("tokio".to_owned(), "isolate-leader".to_owned())];
        assert_eq!(row.faults, 2);
        assert_eq!(row.no_holder_after_heal, 2);
        assert!(row.time_to_holder_ns.is_empty());
    }

    #[test]
    fn groups_are_checked_apart() {
        let mut records = vec![rec(1, 1, Belief::Held { seq: 5 })];
        records.push(Record {
            group: "go".to_owned(),
            ..rec(2, 2, Belief::Held { seq: 3 })
        });
        let report = check(&records, &[], 0, 10 * S);
        assert_eq!(report.groups(), vec!["go".to_owned(), "tokio".to_owned()]);
        assert_eq!(report.total("tokio").overlaps, 0);
        assert_eq!(report.total("go").seq_regressions, 0);
    }
}
