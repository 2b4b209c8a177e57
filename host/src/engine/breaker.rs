//! Circuit breakers: one per tool that has a `breaker` entry, shared by every run the process
//! drives, and kept in the state so that later `uet run`s and daemon restarts see them.
//!
//! Closed, a tool takes attempts, but never more at once than the failures it has left before
//! opening, so a failing tool is not flooded by a wide workflow. After `failures` consecutive
//! failures it opens: steps that need it wait (no attempt is used, the tool is not called)
//! until `cool_down` has passed. Then one probe attempt goes through (half-open): success
//! closes the circuit, failure opens it for another `cool_down`.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::{BreakerChange, BreakerPhase, BreakerRecord, Millis, Outcome};
use crate::spec::tools::Tool;
use crate::state::{StateError, Store};

/// The answer to [`Breakers::admit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Start the attempt (it must be [`Breakers::settle`]d when it ends); `probe` when it is
    /// the half-open breaker's one probe.
    Go {
        /// Whether this attempt is the probe.
        probe: bool,
    },
    /// Do not call the tool yet: ask again at this time, or (for `None`) when another attempt
    /// of the tool ends.
    Wait(Option<Millis>),
}

#[derive(Default)]
struct Live {
    record: BreakerRecord,
    in_flight: u32,
    probing: bool,
}

/// The breakers of every tool, for all runs of this process.
pub struct Breakers {
    live: Mutex<HashMap<String, Live>>,
    /// Bumped whenever an attempt ends or a breaker changes: waiting steps ask again then.
    changed: tokio::sync::watch::Sender<u64>,
    /// A breaker opened or closed here, for whoever shares breakers with other processes
    /// (a fleet's nodes).
    news: tokio::sync::broadcast::Sender<(String, BreakerRecord)>,
}

/// How many openings and closings a slow listener may fall behind by.
const NEWS: usize = 64;

impl Breakers {
    /// Breakers as the state left them. One that was half-open (its probe cut off by a stop)
    /// lets a new probe through at once.
    pub fn load(store: &Store) -> Result<Breakers, StateError> {
        let mut live = HashMap::new();
        for (tool, mut record) in store.breakers()? {
            if record.phase == BreakerPhase::HalfOpen {
                record.phase = BreakerPhase::Open;
            }
            live.insert(
                tool,
                Live {
                    record,
                    in_flight: 0,
                    probing: false,
                },
            );
        }
        Ok(Breakers {
            live: Mutex::new(live),
            changed: tokio::sync::watch::Sender::new(0),
            news: tokio::sync::broadcast::Sender::new(NEWS),
        })
    }

    /// Breakers with no history (tests, and tools never seen).
    pub fn empty() -> Breakers {
        Breakers {
            live: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            news: tokio::sync::broadcast::Sender::new(NEWS),
        }
    }

    /// A receiver that sees every change worth asking [`Breakers::admit`] again.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every breaker that opens or closes here from now on, with its record.
    pub fn news(&self) -> tokio::sync::broadcast::Receiver<(String, BreakerRecord)> {
        self.news.subscribe()
    }

    /// Takes another process's word for a tool's breaker (by [`Tool::key`]): opened there (until a later probe
    /// time than this one knew), or closed there by a probe that succeeded. Steps waiting on
    /// it ask again; nothing is said back (no news).
    pub fn adopt(&self, tool: &str, record: &BreakerRecord) -> bool {
        {
            let mut all = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let live = all.entry(tool.to_string()).or_default();
            let r = &mut live.record;
            match record.phase {
                BreakerPhase::Open => {
                    if r.phase == BreakerPhase::Open && r.probe_at >= record.probe_at {
                        return false;
                    }
                    r.phase = BreakerPhase::Open;
                    r.opened_at = record.opened_at;
                    r.probe_at = record.probe_at;
                    r.failures = r.failures.max(record.failures);
                }
                BreakerPhase::Closed => {
                    if r.phase == BreakerPhase::Closed {
                        return false;
                    }
                    r.phase = BreakerPhase::Closed;
                    r.failures = 0;
                    r.probe_at = None;
                    live.probing = false;
                }
                // a probe elsewhere is that process's own business
                BreakerPhase::HalfOpen => return false,
            }
        }
        self.changed.send_modify(|n| *n += 1);
        true
    }

    /// A tool's breaker now (by [`Tool::key`]), if it has one that has been used.
    pub fn get(&self, tool: &str) -> Option<BreakerRecord> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(tool).map(|l| l.record.clone())
    }

    /// Every breaker that has been used, by tool identity ([`Tool::key`]).
    pub fn all(&self) -> Vec<(String, BreakerRecord)> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = live
            .iter()
            .map(|(t, l)| (t.clone(), l.record.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// May an attempt of `tool` start now?
    pub fn admit(&self, tool: &Tool, now: Millis) -> (Admission, Option<BreakerChange>) {
        let Some(settings) = tool.breaker else {
            return (Admission::Go { probe: false }, None);
        };
        let mut all = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let live = all.entry(tool.key.clone()).or_default();
        match live.record.phase {
            BreakerPhase::Closed => {
                // never more in flight than the failures left before opening
                let room = settings
                    .failures
                    .saturating_sub(live.record.failures)
                    .max(1);
                if live.in_flight < room {
                    live.in_flight += 1;
                    (Admission::Go { probe: false }, None)
                } else {
                    (Admission::Wait(None), None)
                }
            }
            BreakerPhase::Open => {
                let due = live.record.probe_at.unwrap_or(0);
                if now < due {
                    return (Admission::Wait(Some(due)), None);
                }
                live.record.phase = BreakerPhase::HalfOpen;
                live.probing = true;
                live.in_flight += 1;
                let transition = BreakerChange {
                    tool: tool.key.clone(),
                    record: live.record.clone(),
                    event: Some((
                        "breaker.half_open".into(),
                        format!("tool `{}`: cool-down over; one probe attempt", tool.name),
                    )),
                };
                (Admission::Go { probe: true }, Some(transition))
            }
            BreakerPhase::HalfOpen if live.probing => (Admission::Wait(None), None),
            BreakerPhase::HalfOpen => {
                // the last probe was cut off without a verdict: this attempt is the probe
                live.probing = true;
                live.in_flight += 1;
                (Admission::Go { probe: true }, None)
            }
        }
    }

    /// An admitted attempt of `tool` (the probe, if `probe`) ended with `outcome`.
    pub fn settle(
        &self,
        tool: &Tool,
        probe: bool,
        outcome: Outcome,
        now: Millis,
    ) -> Option<BreakerChange> {
        let settings = tool.breaker?;
        let transition = {
            let mut all = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let live = all.get_mut(&tool.key)?;
            live.in_flight = live.in_flight.saturating_sub(1);
            let was_probe = probe && live.record.phase == BreakerPhase::HalfOpen;
            if probe {
                live.probing = false;
            }
            let r = &mut live.record;
            let event = match outcome {
                Outcome::Succeeded => {
                    let reopened = r.phase != BreakerPhase::Closed;
                    let changed = reopened || r.failures > 0;
                    r.phase = BreakerPhase::Closed;
                    r.failures = 0;
                    r.probe_at = None;
                    if !changed {
                        None
                    } else if reopened {
                        Some(Some((
                            "breaker.closed".to_string(),
                            format!("tool `{}`: the probe succeeded", tool.name),
                        )))
                    } else {
                        Some(None)
                    }
                }
                // stopped from outside: says nothing about the tool
                Outcome::Canceled | Outcome::Interrupted => None,
                _ => {
                    r.failures += 1;
                    let cool_down = settings.cool_down.as_millis() as u64;
                    let open = |r: &mut BreakerRecord| {
                        r.phase = BreakerPhase::Open;
                        r.opened_at = Some(now);
                        r.probe_at = Some(now + cool_down);
                    };
                    if was_probe {
                        open(r);
                        Some(Some((
                            "breaker.opened".to_string(),
                            format!(
                                "tool `{}`: the probe failed; next probe in {}",
                                tool.name,
                                humantime::format_duration(settings.cool_down)
                            ),
                        )))
                    } else if r.phase == BreakerPhase::Closed && r.failures >= settings.failures {
                        open(r);
                        Some(Some((
                            "breaker.opened".to_string(),
                            format!(
                                "tool `{}`: {} consecutive failures; probe in {}",
                                tool.name,
                                r.failures,
                                humantime::format_duration(settings.cool_down)
                            ),
                        )))
                    } else {
                        Some(None)
                    }
                }
            };
            event.map(|event| BreakerChange {
                tool: tool.key.clone(),
                record: live.record.clone(),
                event,
            })
        };
        if let Some(BreakerChange {
            event: Some(_),
            record,
            ..
        }) = &transition
            && record.phase != BreakerPhase::HalfOpen
        {
            // no one listening is fine: a daemon alone shares nothing
            let _ = self.news.send((tool.key.clone(), record.clone()));
        }
        self.changed.send_modify(|n| *n += 1);
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tools::{BreakerSettings, Tools};

    fn tool(failures: u32, cool_down_ms: u64) -> Tool {
        let tools = Tools::parse(
            std::path::Path::new("tools.toml"),
            b"[[tools]]\nname = \"t\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        let mut t = tools.tools[0].clone();
        t.breaker = Some(BreakerSettings {
            failures,
            cool_down: std::time::Duration::from_millis(cool_down_ms),
        });
        t
    }

    #[test]
    fn opens_after_consecutive_failures_then_lets_one_probe_through() {
        let b = Breakers::empty();
        let t = tool(2, 1000);
        for _ in 0..2 {
            assert_eq!(b.admit(&t, 0).0, Admission::Go { probe: false });
        }
        // two failures left before opening: no third attempt at once
        assert_eq!(b.admit(&t, 0).0, Admission::Wait(None));
        assert!(
            b.settle(&t, false, Outcome::Failed, 10)
                .unwrap()
                .event
                .is_none()
        );
        let opened = b.settle(&t, false, Outcome::TimedOut, 20).unwrap();
        assert_eq!(opened.event.unwrap().0, "breaker.opened");
        assert_eq!(opened.record.probe_at, Some(1020));
        assert_eq!(b.admit(&t, 500).0, Admission::Wait(Some(1020)));
        let (go, half) = b.admit(&t, 1020);
        assert_eq!(go, Admission::Go { probe: true });
        assert_eq!(half.unwrap().record.phase, BreakerPhase::HalfOpen);
        assert_eq!(b.admit(&t, 1021).0, Admission::Wait(None), "one probe only");
        let reopened = b.settle(&t, true, Outcome::Failed, 1100).unwrap();
        assert_eq!(reopened.record.phase, BreakerPhase::Open);
        assert_eq!(reopened.record.probe_at, Some(2100));
        assert_eq!(b.admit(&t, 2100).0, Admission::Go { probe: true });
        let closed = b.settle(&t, true, Outcome::Succeeded, 2200).unwrap();
        assert_eq!(closed.event.unwrap().0, "breaker.closed");
        assert_eq!(closed.record.failures, 0);
        assert_eq!(b.admit(&t, 2200).0, Admission::Go { probe: false });
    }

    #[test]
    fn a_cut_off_probe_leaves_room_for_another_and_tools_without_breakers_always_go() {
        let b = Breakers::empty();
        let t = tool(1, 100);
        assert_eq!(b.admit(&t, 0).0, Admission::Go { probe: false });
        b.settle(&t, false, Outcome::Failed, 0);
        assert_eq!(b.admit(&t, 100).0, Admission::Go { probe: true });
        assert!(b.settle(&t, true, Outcome::Canceled, 150).is_none());
        assert_eq!(
            b.admit(&t, 160).0,
            Admission::Go { probe: true },
            "a new probe"
        );
        let mut plain = t.clone();
        plain.breaker = None;
        for _ in 0..10 {
            assert_eq!(b.admit(&plain, 0).0, Admission::Go { probe: false });
            assert!(b.settle(&plain, false, Outcome::Failed, 0).is_none());
        }
    }
}
