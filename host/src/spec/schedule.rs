//! Cron schedules of standing workflows: `[trigger] schedule = "0 */2 * * *"`, read in a time
//! zone the workflow states (UTC unless it says `timezone = "local"` or an IANA name such as
//! `"Europe/Paris"`).

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};

/// The zone a schedule's times are read in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// Coordinated universal time: the default, the same on every machine.
    Utc,
    /// The machine's own zone (`/etc/localtime`, `TZ`).
    Local,
    /// A named zone of the IANA database.
    Named(chrono_tz::Tz),
}

impl Zone {
    /// `"UTC"`, `"local"` or an IANA name.
    pub fn parse(text: &str) -> Result<Zone, String> {
        match text {
            "UTC" | "utc" => Ok(Zone::Utc),
            "local" => Ok(Zone::Local),
            name => chrono_tz::Tz::from_str(name).map(Zone::Named).map_err(|_| {
                format!("unknown time zone {name:?}: write \"UTC\", \"local\" or an IANA name such as \"Europe/Paris\"")
            }),
        }
    }
}

/// Checks a cron pattern: five fields (minute hour day-of-month month day-of-week), or six
/// with seconds first.
pub fn check(pattern: &str) -> Result<(), String> {
    croner::Cron::from_str(pattern)
        .map(|_| ())
        .map_err(|e| format!("bad cron schedule {pattern:?}: {e}"))
}

/// The first time the pattern matches strictly after `after_ms` (milliseconds since the epoch),
/// in `zone`; `None` when it never will (a pattern such as 30 February).
pub fn next_after(pattern: &str, zone: Zone, after_ms: u64) -> Option<u64> {
    let cron = croner::Cron::from_str(pattern).ok()?;
    let after = Utc.timestamp_millis_opt(after_ms as i64).single()?;
    fn next<Z: TimeZone>(cron: &croner::Cron, at: DateTime<Z>) -> Option<u64>
    where
        DateTime<Z>: croner::CronDateTime,
    {
        let found = cron.find_next_occurrence(&at, false).ok()?;
        u64::try_from(found.timestamp_millis()).ok()
    }
    match zone {
        Zone::Utc => next(&cron, after),
        Zone::Local => next(&cron, after.with_timezone(&chrono::Local)),
        Zone::Named(tz) => next(&cron, after.with_timezone(&tz)),
    }
}

/// The latest time the pattern matched in `(since_ms, until_ms]`, if any: a run a stopped
/// daemon missed.
pub fn missed(pattern: &str, zone: Zone, since_ms: u64, until_ms: u64) -> Option<u64> {
    let mut at = since_ms;
    let mut last = None;
    // a schedule that fires every minute has missed at most this many in a long stop; the
    // latest is all that matters, so the walk is cut short
    for _ in 0..100_000 {
        match next_after(pattern, zone, at) {
            Some(t) if t <= until_ms => {
                last = Some(t);
                at = t;
            }
            _ => break,
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_times_in_a_stated_zone() {
        // 2026-12-01T10:17:00Z
        let at = 1_796_120_220_000;
        let next = next_after("0 */2 * * *", Zone::Utc, at).unwrap();
        assert_eq!(next, 1_796_126_400_000, "12:00 UTC");
        let paris = Zone::parse("Europe/Paris").unwrap();
        // 12:00 in Paris (UTC+1 in December) is 11:00 UTC
        assert_eq!(
            next_after("0 12 * * *", paris, at).unwrap(),
            1_796_122_800_000
        );
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert!(check("0 */2 * * *").is_ok());
        assert!(check("61 * * * *").is_err());
        assert!(check("every day").is_err());
        assert_eq!(
            missed("0 */2 * * *", Zone::Utc, at - 5 * 3_600_000, at),
            Some(1_796_119_200_000),
            "10:00 was the last one missed"
        );
        assert_eq!(missed("0 */2 * * *", Zone::Utc, at - 60_000, at), None);
    }
}
