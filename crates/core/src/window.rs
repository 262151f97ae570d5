//! Business windows: "wait until the next opening of Mon–Fri 09:00–17:00 America/New_York".
//!
//! Owns the `window` object of a wait step: parsing and checking it ([`BusinessWindow::parse`],
//! which reports every problem with its JSONPath), its canonical JSON form
//! ([`BusinessWindow::to_json`]) and the calendar arithmetic that answers "is the window open at
//! `now`, and if not, when does it next open?" ([`BusinessWindow::next_opening`]).
//!
//! Pure: `now` is passed in as a [`Timestamp`]; the IANA time zone database is compiled in
//! (chrono-tz), so nothing is read from the system.
//!
//! # Semantics
//!
//! On each window day `d`, in the window's time zone, the opening is the half-open interval of
//! instants `[resolve(d, from), resolve(d, to))`, where `resolve(d, t)` is the earliest instant
//! at which the local clock reads `d t` or later (`to` = `24:00` is midnight at the end of `d`).
//! So across daylight-saving changes:
//! - a local time that does not exist (the spring-forward gap) resolves to the first instant
//!   after the gap (02:30 on 2026-03-08 in New York is 03:00 EDT);
//! - a local time that happens twice (fall back) resolves to the earlier instant (01:30 on
//!   2026-11-01 in New York is 01:30 EDT, not EST), for opening and closing alike;
//! - a window that lies entirely inside a gap is empty on that day, and has no opening then.
//!
//! Windows never cross midnight (`from < to` is required): a night window is two windows.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

use crate::render::{path_index, path_key};
use crate::time::Timestamp;

/// The day names, Monday first (index = `Weekday::num_days_from_monday`).
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The fields of a window object.
const FIELDS: [&str; 4] = ["days", "from", "to", "tz"];

/// Minutes in a day: a `to` of `24:00`.
const END_OF_DAY: u32 = 24 * 60;

/// How far ahead [`BusinessWindow::next_opening`] looks, in days.
const HORIZON_DAYS: i64 = 8;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// A weekly business window in one time zone: on each of `days`, open from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessWindow {
    /// Which weekdays have an opening, Monday first.
    days: [bool; 7],
    /// Local opening time, minutes after midnight, `0..1440`.
    from_minute: u32,
    /// Local closing time, minutes after midnight, `from_minute + 1..=1440`.
    to_minute: u32,
    tz: Tz,
}

/// One thing wrong with a window object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowProblem {
    /// JSONPath of the offending value, built on the base path given to
    /// [`BusinessWindow::parse`]: `{base}.days[2]`, `{base}.tz`.
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for WindowProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// The answer of [`BusinessWindow::next_opening`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// `now` is inside an opening, which closes (exclusive) at `closes_at`.
    OpenNow { closes_at: Timestamp },
    /// The window is closed at `now`; the next opening starts at this instant.
    At(Timestamp),
}

impl BusinessWindow {
    /// Parse the window object at `base_path` (e.g. `$.steps[2].config.window`), reporting every
    /// problem at once:
    /// - `days`: a non-empty array of unique day names `"mon"`..`"sun"` (lowercase);
    /// - `from`, `to`: `"HH:MM"`, 24-hour, `00:00`..`23:59`; `to` may also be `24:00` (end of
    ///   the day); `from` must be before `to` (windows crossing midnight are refused);
    /// - `tz`: an IANA time zone name, e.g. `"America/New_York"`;
    /// - no other fields.
    pub fn parse(v: &Value, base_path: &str) -> Result<BusinessWindow, Vec<WindowProblem>> {
        let mut problems = Problems(Vec::new());
        let Value::Object(obj) = v else {
            problems.push(
                base_path.to_string(),
                format!("must be an object, not {}", type_name(v)),
            );
            return Err(problems.0);
        };
        for key in obj.keys() {
            if !FIELDS.contains(&key.as_str()) {
                problems.push(path_key(base_path, key), "unknown field");
            }
        }
        let days = parse_days(obj, base_path, &mut problems);
        let from = parse_time(obj, "from", base_path, false, &mut problems);
        let to = parse_time(obj, "to", base_path, true, &mut problems);
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                let problem = if f == t {
                    format!(
                        "must be later than from ({}): the window would be empty",
                        format_minute(f)
                    )
                } else {
                    format!(
                        "must be later than from ({}): windows that cross midnight are not \
                         supported; use \"to\": \"24:00\" and a second window from \"00:00\"",
                        format_minute(f)
                    )
                };
                problems.push(path_key(base_path, "to"), problem);
            }
        }
        let tz = parse_tz(obj, base_path, &mut problems);
        match (days, from, to, tz) {
            (Some(days), Some(from_minute), Some(to_minute), Some(tz)) if problems.0.is_empty() => {
                Ok(BusinessWindow {
                    days,
                    from_minute,
                    to_minute,
                    tz,
                })
            }
            _ => Err(problems.0),
        }
    }

    /// Whether the window is open at `now` (and until when), or else when it next opens.
    ///
    /// Local days and times are in the window's time zone, with the DST rules of the module doc:
    /// a start in a spring-forward gap opens at the first instant after the gap, an ambiguous
    /// one (fall back) at the earlier instant. Looks at most 8 days ahead; since `days` is
    /// never empty, an opening always lies within that. Were none found (a zone whose
    /// transitions swallow the window two weeks running) or were `now` outside the calendar's
    /// range (±262,000 years), the answer is `At(now + 8 days)`, i.e. "look again then".
    pub fn next_opening(&self, now: Timestamp) -> Opening {
        let fallback = Opening::At(now.plus_millis(HORIZON_DAYS * DAY_MS));
        let Some(now_utc) = DateTime::<Utc>::from_timestamp_millis(now.millis()) else {
            return fallback;
        };
        let Some(today) = local_of(&self.tz, now_utc).map(|t| t.date()) else {
            return fallback;
        };
        // From yesterday: a fall back across midnight can put `now` on yesterday's local date
        // while today's opening has already begun, and the reverse.
        for offset in -1..=HORIZON_DAYS {
            let Some(day) = today.checked_add_signed(TimeDelta::days(offset)) else {
                continue;
            };
            let Some((opens, closes)) = self.opening_on(day) else {
                continue;
            };
            if closes <= now {
                continue;
            }
            return if opens <= now {
                Opening::OpenNow { closes_at: closes }
            } else {
                Opening::At(opens)
            };
        }
        fallback
    }

    /// The canonical form: days in week order (Monday first), times as `HH:MM`, the zone's
    /// IANA name. [`BusinessWindow::parse`] reads it back to the same window.
    pub fn to_json(&self) -> Value {
        let days: Vec<Value> = DAY_NAMES
            .iter()
            .zip(self.days)
            .filter(|(_, on)| *on)
            .map(|(name, _)| Value::String((*name).to_string()))
            .collect();
        serde_json::json!({
            "days": days,
            "from": format_minute(self.from_minute),
            "to": format_minute(self.to_minute),
            "tz": self.tz.name(),
        })
    }

    /// Which weekdays have an opening, Monday first.
    pub fn days(&self) -> [bool; 7] {
        self.days
    }

    /// The local opening time in minutes after midnight (`0..1440`).
    pub fn from_minute(&self) -> u32 {
        self.from_minute
    }

    /// The local closing time in minutes after midnight (up to `1440`, the end of the day).
    pub fn to_minute(&self) -> u32 {
        self.to_minute
    }

    /// The window's time zone.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The opening on local date `day`, as `[opens, closes)`: `None` when `day` is not a window
    /// day or the opening is empty (it lies inside a DST gap).
    fn opening_on(&self, day: NaiveDate) -> Option<(Timestamp, Timestamp)> {
        let weekday = day.weekday().num_days_from_monday() as usize;
        if !self.days.get(weekday).copied().unwrap_or(false) {
            return None;
        }
        let opens = resolve(&self.tz, local_time(day, self.from_minute)?)?;
        let closes = resolve(&self.tz, local_time(day, self.to_minute)?)?;
        (opens < closes).then_some((opens, closes))
    }
}

/// Problems collected while parsing.
struct Problems(Vec<WindowProblem>);

impl Problems {
    fn push(&mut self, path: String, problem: impl Into<String>) {
        self.0.push(WindowProblem {
            path,
            problem: problem.into(),
        });
    }
}

fn parse_days(obj: &Map<String, Value>, base: &str, problems: &mut Problems) -> Option<[bool; 7]> {
    let path = path_key(base, "days");
    let items = match obj.get("days") {
        None => {
            problems.push(path, "is required");
            return None;
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            problems.push(
                path,
                format!(
                    "must be an array of day names (\"mon\"..\"sun\"), not {}",
                    type_name(other)
                ),
            );
            return None;
        }
    };
    if items.is_empty() {
        problems.push(path, "must name at least one day");
        return None;
    }
    let mut days = [false; 7];
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = path_index(&path, i);
        let index = match item {
            Value::String(s) => DAY_NAMES.iter().position(|d| d == s),
            _ => None,
        };
        match (index, item) {
            (Some(d), _) if days[d] => {
                problems.push(p, format!("duplicate day \"{}\"", DAY_NAMES[d]));
                ok = false;
            }
            (Some(d), _) => days[d] = true,
            (None, Value::String(s)) => {
                problems.push(
                    p,
                    format!(
                        "unknown day {}: expected one of {}",
                        Value::String(s.clone()),
                        DAY_NAMES.join(", ")
                    ),
                );
                ok = false;
            }
            (None, other) => {
                problems.push(
                    p,
                    format!(
                        "must be a day name (one of {}), not {}",
                        DAY_NAMES.join(", "),
                        type_name(other)
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(days)
}

/// `from` or `to` as minutes after midnight; `24:00` (1440) only when `allow_end_of_day`.
fn parse_time(
    obj: &Map<String, Value>,
    key: &str,
    base: &str,
    allow_end_of_day: bool,
    problems: &mut Problems,
) -> Option<u32> {
    let path = path_key(base, key);
    let expected = if allow_end_of_day {
        "a 24-hour time \"HH:MM\" from 00:00 to 23:59, or 24:00 for the end of the day"
    } else {
        "a 24-hour time \"HH:MM\" from 00:00 to 23:59"
    };
    match obj.get(key) {
        None => {
            problems.push(path, "is required");
            None
        }
        Some(Value::String(s)) => match hh_mm(s) {
            Some(m) if m < END_OF_DAY || (m == END_OF_DAY && allow_end_of_day) => Some(m),
            Some(_) => {
                let problem = format!("24:00 is only allowed for to; expected {expected}");
                problems.push(path, problem);
                None
            }
            None => {
                let problem = format!("{} is not {expected}", Value::String(s.clone()));
                problems.push(path, problem);
                None
            }
        },
        Some(other) => {
            problems.push(
                path,
                format!("must be {expected}, not {}", type_name(other)),
            );
            None
        }
    }
}

/// `"HH:MM"` (exactly two digits each) as minutes after midnight, `00:00`..=`24:00`.
fn hh_mm(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' {
        return None;
    }
    let digit = |c: u8| c.is_ascii_digit().then(|| u32::from(c - b'0'));
    let hours = digit(b[0])? * 10 + digit(b[1])?;
    let minutes = digit(b[3])? * 10 + digit(b[4])?;
    if minutes > 59 || hours > 24 || (hours == 24 && minutes != 0) {
        return None;
    }
    Some(hours * 60 + minutes)
}

fn parse_tz(obj: &Map<String, Value>, base: &str, problems: &mut Problems) -> Option<Tz> {
    let path = path_key(base, "tz");
    match obj.get("tz") {
        None => {
            problems.push(path, "is required");
            None
        }
        Some(Value::String(s)) => match s.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                problems.push(
                    path,
                    format!(
                        "unknown time zone {}: expected an IANA name such as \"America/New_York\"",
                        Value::String(s.clone())
                    ),
                );
                None
            }
        },
        Some(other) => {
            problems.push(
                path,
                format!(
                    "must be an IANA time zone name such as \"America/New_York\", not {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn format_minute(m: u32) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The local date-time `minute` minutes after the start of `day` (1440 = the next midnight).
fn local_time(day: NaiveDate, minute: u32) -> Option<NaiveDateTime> {
    day.and_hms_opt(0, 0, 0)?
        .checked_add_signed(TimeDelta::minutes(i64::from(minute)))
}

/// What the local clock of `tz` reads at `utc` (`None` past the calendar's range, where
/// chrono's own conversion would panic).
fn local_of(tz: &Tz, utc: DateTime<Utc>) -> Option<NaiveDateTime> {
    let offset = tz.offset_from_utc_datetime(&utc.naive_utc()).fix();
    utc.naive_utc().checked_add_offset(offset)
}

/// The earliest instant at which the local clock of `tz` reads `local` or later: `local`
/// itself when it happens once, its earlier instant when it happens twice (fall back), the end
/// of the gap when it does not happen (spring forward).
fn resolve(tz: &Tz, local: NaiveDateTime) -> Option<Timestamp> {
    if let Some(t) = tz.from_local_datetime(&local).earliest() {
        return Some(Timestamp(t.timestamp_millis()));
    }
    // In a gap. Find the first whole local minute after `local` that exists: the gap ends
    // within the minute before it (gaps are at most a day; 26 hours bounds the search).
    let mut minute = local;
    let mut first_after = None;
    for _ in 0..26 * 60 {
        minute = minute.checked_add_signed(TimeDelta::minutes(1))?;
        if let Some(t) = tz.from_local_datetime(&minute).earliest() {
            first_after = Some(t.with_timezone(&Utc));
            break;
        }
    }
    let first_after = first_after?;
    // Offsets and transitions are whole seconds. Walk back second by second while the clock
    // still runs continuously (reads `minute - k s`): the last such instant is the gap's end.
    let mut gap_end = first_after;
    for k in 1..=60 {
        let before = first_after.checked_sub_signed(TimeDelta::seconds(k))?;
        if local_of(tz, before)? != minute.checked_sub_signed(TimeDelta::seconds(k))? {
            break;
        }
        gap_end = before;
    }
    Some(Timestamp(gap_end.timestamp_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const BASE: &str = "$.steps[2].config.window";

    fn window(v: Value) -> BusinessWindow {
        match BusinessWindow::parse(&v, BASE) {
            Ok(w) => w,
            Err(problems) => panic!("{v} should parse, got {problems:?}"),
        }
    }

    fn problems(v: Value) -> Vec<(String, String)> {
        match BusinessWindow::parse(&v, BASE) {
            Ok(w) => panic!("{v} should not parse, got {w:?}"),
            Err(p) => p.into_iter().map(|p| (p.path, p.problem)).collect(),
        }
    }

    /// The instant of a local date-time in `tz`, which must exist and be unambiguous.
    fn at(tz: &str, local: &str) -> Timestamp {
        let tz: Tz = tz.parse().unwrap();
        let naive = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M").unwrap();
        Timestamp(
            tz.from_local_datetime(&naive)
                .single()
                .unwrap()
                .timestamp_millis(),
        )
    }

    /// An instant given in UTC with an explicit offset, RFC 3339.
    fn rfc(s: &str) -> Timestamp {
        Timestamp(DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis())
    }

    fn ny_weekdays() -> BusinessWindow {
        window(json!({
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "from": "09:00", "to": "17:00", "tz": "America/New_York"
        }))
    }

    const NY: &str = "America/New_York";

    #[test]
    fn inside_the_window_is_open_until_close() {
        // 2026-03-04 is a Wednesday.
        let w = ny_weekdays();
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 10:30")),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-04 17:00")
            }
        );
        // The opening instant itself is inside; the closing instant is not.
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 09:00")),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-04 17:00")
            }
        );
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 17:00").plus_millis(-1)),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-04 17:00")
            }
        );
    }

    #[test]
    fn before_opening_opens_the_same_day() {
        let w = ny_weekdays();
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 07:15")),
            Opening::At(at(NY, "2026-03-04 09:00"))
        );
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 09:00").plus_millis(-1)),
            Opening::At(at(NY, "2026-03-04 09:00"))
        );
        // Just after local midnight, which is a different UTC date.
        assert_eq!(
            w.next_opening(rfc("2026-03-04T05:30:00Z")),
            Opening::At(at(NY, "2026-03-04 09:00"))
        );
    }

    #[test]
    fn after_close_opens_the_next_working_day() {
        let w = ny_weekdays();
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 17:00")),
            Opening::At(at(NY, "2026-03-05 09:00"))
        );
        // 23:30 in New York is already the next day in UTC.
        assert_eq!(
            w.next_opening(at(NY, "2026-03-04 23:30")),
            Opening::At(at(NY, "2026-03-05 09:00"))
        );
    }

    #[test]
    fn friday_evening_opens_monday_morning_in_new_york() {
        let w = ny_weekdays();
        // Friday 2026-03-06 18:00 EST -> Monday 2026-03-09 09:00 EDT (DST began on Sunday).
        assert_eq!(
            w.next_opening(at(NY, "2026-03-06 18:00")),
            Opening::At(rfc("2026-03-09T09:00:00-04:00"))
        );
        // Saturday and Sunday too.
        assert_eq!(
            w.next_opening(at(NY, "2026-03-07 12:00")),
            Opening::At(rfc("2026-03-09T09:00:00-04:00"))
        );
        // An ordinary Friday in summer.
        assert_eq!(
            w.next_opening(at(NY, "2026-07-10 17:30")),
            Opening::At(rfc("2026-07-13T09:00:00-04:00"))
        );
    }

    #[test]
    fn weekend_only_window() {
        let w = window(json!({
            "days": ["sun", "sat"], "from": "10:00", "to": "14:00", "tz": "Europe/London"
        }));
        const LDN: &str = "Europe/London";
        // Wednesday 2026-07-15 -> Saturday 2026-07-18 10:00 BST.
        assert_eq!(
            w.next_opening(at(LDN, "2026-07-15 12:00")),
            Opening::At(rfc("2026-07-18T10:00:00+01:00"))
        );
        // Saturday after close -> Sunday.
        assert_eq!(
            w.next_opening(at(LDN, "2026-07-18 15:00")),
            Opening::At(at(LDN, "2026-07-19 10:00"))
        );
        // Sunday after close -> next Saturday.
        assert_eq!(
            w.next_opening(at(LDN, "2026-07-19 14:00")),
            Opening::At(at(LDN, "2026-07-25 10:00"))
        );
        assert_eq!(
            w.next_opening(at(LDN, "2026-07-19 13:59")),
            Opening::OpenNow {
                closes_at: at(LDN, "2026-07-19 14:00")
            }
        );
    }

    #[test]
    fn single_day_window_waits_a_week() {
        let w = window(json!({
            "days": ["wed"], "from": "09:00", "to": "10:00", "tz": "UTC"
        }));
        assert_eq!(
            w.next_opening(rfc("2026-03-04T09:00:00Z").plus_millis(1)),
            Opening::OpenNow {
                closes_at: rfc("2026-03-04T10:00:00Z")
            }
        );
        assert_eq!(
            w.next_opening(rfc("2026-03-04T10:00:00Z")),
            Opening::At(rfc("2026-03-11T09:00:00Z"))
        );
    }

    #[test]
    fn to_of_24_00_closes_at_midnight() {
        let w = window(json!({
            "days": ["mon", "tue"], "from": "20:00", "to": "24:00", "tz": NY
        }));
        // Monday 2026-03-02 21:00 -> closes at Tuesday 00:00 local.
        assert_eq!(
            w.next_opening(at(NY, "2026-03-02 21:00")),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-03 00:00")
            }
        );
        assert_eq!(
            w.next_opening(at(NY, "2026-03-03 00:00").plus_millis(-1)),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-03 00:00")
            }
        );
        // At Tuesday midnight it is closed until Tuesday 20:00.
        assert_eq!(
            w.next_opening(at(NY, "2026-03-03 00:00")),
            Opening::At(at(NY, "2026-03-03 20:00"))
        );
        // A whole-day window: open until midnight, then the next day's opening follows on.
        let all_day = window(json!({
            "days": ["mon", "tue"], "from": "00:00", "to": "24:00", "tz": NY
        }));
        assert_eq!(
            all_day.next_opening(at(NY, "2026-03-02 23:59")),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-03 00:00")
            }
        );
        assert_eq!(
            all_day.next_opening(at(NY, "2026-03-03 00:00")),
            Opening::OpenNow {
                closes_at: at(NY, "2026-03-04 00:00")
            }
        );
        assert_eq!(
            all_day.next_opening(at(NY, "2026-03-04 00:00")),
            Opening::At(at(NY, "2026-03-09 00:00"))
        );
        assert_eq!(all_day.to_json()["to"], json!("24:00"));
    }

    #[test]
    fn dst_spring_forward_gap_opens_after_the_gap() {
        // 2026-03-08 (Sunday) in New York: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        let w = window(json!({
            "days": ["sun"], "from": "02:30", "to": "05:00", "tz": NY
        }));
        let gap_end = rfc("2026-03-08T03:00:00-04:00");
        assert_eq!(gap_end, rfc("2026-03-08T07:00:00Z"));
        assert_eq!(
            w.next_opening(at(NY, "2026-03-08 01:00")),
            Opening::At(gap_end)
        );
        assert_eq!(
            w.next_opening(gap_end.plus_millis(-1)),
            Opening::At(gap_end)
        );
        assert_eq!(
            w.next_opening(gap_end),
            Opening::OpenNow {
                closes_at: rfc("2026-03-08T05:00:00-04:00")
            }
        );
        // The Sunday before, 02:30 exists (EST).
        assert_eq!(
            w.next_opening(at(NY, "2026-03-01 00:00")),
            Opening::At(rfc("2026-03-01T02:30:00-05:00"))
        );
        // A window that lies entirely in the gap is empty that day: next Sunday instead.
        let in_gap = window(json!({
            "days": ["sun"], "from": "02:10", "to": "02:50", "tz": NY
        }));
        assert_eq!(
            in_gap.next_opening(at(NY, "2026-03-08 01:00")),
            Opening::At(rfc("2026-03-15T02:10:00-04:00"))
        );
        // A close inside the gap closes when the gap ends.
        let close_in_gap = window(json!({
            "days": ["sun"], "from": "01:00", "to": "02:30", "tz": NY
        }));
        assert_eq!(
            close_in_gap.next_opening(at(NY, "2026-03-08 01:30")),
            Opening::OpenNow { closes_at: gap_end }
        );
    }

    #[test]
    fn dst_fall_back_ambiguous_start_opens_at_the_earlier_instant() {
        // 2026-11-01 (Sunday) in New York: 02:00 EDT falls back to 01:00 EST; 01:30 happens
        // twice, first at 05:30Z (EDT), then at 06:30Z (EST).
        let w = window(json!({
            "days": ["sun"], "from": "01:30", "to": "03:00", "tz": NY
        }));
        let first = rfc("2026-11-01T01:30:00-04:00");
        assert_eq!(first, rfc("2026-11-01T05:30:00Z"));
        assert_eq!(
            w.next_opening(at(NY, "2026-11-01 00:00")),
            Opening::At(first)
        );
        let closes = rfc("2026-11-01T03:00:00-05:00");
        assert_eq!(
            w.next_opening(first),
            Opening::OpenNow { closes_at: closes }
        );
        // During the repeated hour, before the second 01:30, it is still the same opening.
        assert_eq!(
            w.next_opening(rfc("2026-11-01T01:10:00-05:00")),
            Opening::OpenNow { closes_at: closes }
        );
        // An ambiguous close also closes at the earlier instant.
        let close_ambiguous = window(json!({
            "days": ["sun"], "from": "00:30", "to": "01:30", "tz": NY
        }));
        assert_eq!(
            close_ambiguous.next_opening(at(NY, "2026-11-01 00:45")),
            Opening::OpenNow { closes_at: first }
        );
        assert_eq!(
            close_ambiguous.next_opening(first),
            Opening::At(rfc("2026-11-08T00:30:00-05:00"))
        );
    }

    #[test]
    fn half_hour_offset_kolkata() {
        let w = window(json!({
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "from": "09:30", "to": "18:00", "tz": "Asia/Kolkata"
        }));
        // Friday 2026-03-06 12:30Z is 18:00 IST: closed -> Monday 09:30 IST = 04:00Z.
        assert_eq!(
            w.next_opening(rfc("2026-03-06T12:30:00Z")),
            Opening::At(rfc("2026-03-09T04:00:00Z"))
        );
        assert_eq!(
            w.next_opening(rfc("2026-03-06T12:29:59Z")),
            Opening::OpenNow {
                closes_at: rfc("2026-03-06T12:30:00Z")
            }
        );
        // Thursday 2026-03-05 23:00Z is Friday 04:30 IST: opens Friday 09:30 IST.
        assert_eq!(
            w.next_opening(rfc("2026-03-05T23:00:00Z")),
            Opening::At(rfc("2026-03-06T04:00:00Z"))
        );
    }

    #[test]
    fn to_json_is_canonical_and_parses_back() {
        let w = window(json!({
            "days": ["fri", "mon", "wed"], "from": "07:05", "to": "24:00", "tz": "Asia/Kolkata"
        }));
        assert_eq!(
            w.to_json(),
            json!({
                "days": ["mon", "wed", "fri"], "from": "07:05", "to": "24:00", "tz": "Asia/Kolkata"
            })
        );
        assert_eq!(BusinessWindow::parse(&w.to_json(), "$"), Ok(w));
        assert_eq!(w.from_minute(), 7 * 60 + 5);
        assert_eq!(w.to_minute(), 1440);
        assert_eq!(w.days(), [true, false, true, false, true, false, false]);
        assert_eq!(w.tz(), chrono_tz::Asia::Kolkata);
    }

    #[test]
    fn not_an_object() {
        assert_eq!(
            problems(json!(["mon"])),
            vec![(
                BASE.to_string(),
                "must be an object, not an array".to_string()
            )]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let got = problems(json!({
            "days": ["mon", "Tue", 3, "mon", "funday"],
            "from": "9:00",
            "to": "25:00",
            "tz": "Mars/Olympus_Mons",
            "timezone": "UTC",
            "odd key": 1
        }));
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "$.steps[2].config.window['odd key']",
                "$.steps[2].config.window.timezone",
                "$.steps[2].config.window.days[1]",
                "$.steps[2].config.window.days[2]",
                "$.steps[2].config.window.days[3]",
                "$.steps[2].config.window.days[4]",
                "$.steps[2].config.window.from",
                "$.steps[2].config.window.to",
                "$.steps[2].config.window.tz",
            ],
            "{got:?}"
        );
        assert_eq!(got[0].1, "unknown field");
        assert_eq!(got[1].1, "unknown field");
        assert!(got[2].1.contains("unknown day \"Tue\""), "{}", got[2].1);
        assert!(got[3].1.contains("not a number"), "{}", got[3].1);
        assert_eq!(got[4].1, "duplicate day \"mon\"");
        assert!(got[5].1.contains("unknown day \"funday\""), "{}", got[5].1);
        assert!(got[6].1.contains("\"9:00\" is not"), "{}", got[6].1);
        assert!(got[7].1.contains("\"25:00\" is not"), "{}", got[7].1);
        assert!(
            got[8].1.contains("unknown time zone \"Mars/Olympus_Mons\""),
            "{}",
            got[8].1
        );
    }

    #[test]
    fn missing_fields_are_required() {
        let got = problems(json!({}));
        assert_eq!(
            got,
            ["days", "from", "to", "tz"]
                .iter()
                .map(|k| (format!("{BASE}.{k}"), "is required".to_string()))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn days_must_be_a_non_empty_array() {
        assert_eq!(
            problems(json!({"days": [], "from": "09:00", "to": "17:00", "tz": "UTC"})),
            vec![(
                format!("{BASE}.days"),
                "must name at least one day".to_string()
            )]
        );
        let got = problems(json!({"days": "mon", "from": "09:00", "to": "17:00", "tz": "UTC"}));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, format!("{BASE}.days"));
        assert!(got[0].1.contains("must be an array"), "{}", got[0].1);
    }

    #[test]
    fn times_must_be_hh_mm() {
        for bad in [
            "9:00",
            "09:0",
            "0900",
            "09-00",
            "24:01",
            "23:60",
            "-1:00",
            "+9:00",
            "09:00 ",
            "",
            "٠٩:٠٠",
        ] {
            let got = problems(json!({"days": ["mon"], "from": bad, "to": "23:59", "tz": "UTC"}));
            assert_eq!(got.len(), 1, "{bad}: {got:?}");
            assert_eq!(got[0].0, format!("{BASE}.from"), "{bad}");
            assert!(got[0].1.contains("HH:MM"), "{bad}: {}", got[0].1);
        }
        // 24:00 is only a `to`.
        let got = problems(json!({"days": ["mon"], "from": "24:00", "to": "24:00", "tz": "UTC"}));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, format!("{BASE}.from"));
        assert!(got[0].1.contains("is only allowed for to"), "{}", got[0].1);
        // Not a string.
        let got = problems(json!({"days": ["mon"], "from": 900, "to": null, "tz": "UTC"}));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, format!("{BASE}.from"));
        assert!(got[0].1.ends_with("not a number"), "{}", got[0].1);
        assert_eq!(got[1].0, format!("{BASE}.to"));
        assert!(got[1].1.ends_with("not null"), "{}", got[1].1);
        // The edges are fine.
        let w = window(json!({"days": ["mon"], "from": "00:00", "to": "23:59", "tz": "UTC"}));
        assert_eq!((w.from_minute(), w.to_minute()), (0, 23 * 60 + 59));
    }

    #[test]
    fn from_must_be_before_to() {
        let got = problems(json!({"days": ["mon"], "from": "22:00", "to": "06:00", "tz": "UTC"}));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, format!("{BASE}.to"));
        assert!(got[0].1.contains("cross midnight"), "{}", got[0].1);
        let got = problems(json!({"days": ["mon"], "from": "09:00", "to": "09:00", "tz": "UTC"}));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, format!("{BASE}.to"));
        assert!(got[0].1.contains("empty"), "{}", got[0].1);
    }

    #[test]
    fn unknown_time_zones_are_refused() {
        for bad in [
            "Eastern",
            "america/new_york",
            "GMT+25",
            "",
            "America/New_York ",
        ] {
            let got = problems(json!({"days": ["mon"], "from": "09:00", "to": "17:00", "tz": bad}));
            assert_eq!(got.len(), 1, "{bad}: {got:?}");
            assert_eq!(got[0].0, format!("{BASE}.tz"));
            assert!(got[0].1.contains("unknown time zone"), "{}", got[0].1);
        }
        let got = problems(json!({"days": ["mon"], "from": "09:00", "to": "17:00", "tz": 5}));
        assert_eq!(got[0].0, format!("{BASE}.tz"));
        assert!(got[0].1.ends_with("not a number"), "{}", got[0].1);
        for good in [
            "UTC",
            "Europe/Berlin",
            "Australia/Lord_Howe",
            "Pacific/Chatham",
        ] {
            window(json!({"days": ["mon"], "from": "09:00", "to": "17:00", "tz": good}));
        }
    }

    #[test]
    fn out_of_range_instants_do_not_panic() {
        let w = ny_weekdays();
        let max = DateTime::<Utc>::MAX_UTC.timestamp_millis();
        let min = DateTime::<Utc>::MIN_UTC.timestamp_millis();
        for now in [
            i64::MIN,
            min - 1,
            min,
            min + DAY_MS,
            -1,
            0,
            max - 9 * DAY_MS,
            max - DAY_MS,
            max,
            max + 1,
            i64::MAX,
        ] {
            let _ = w.next_opening(Timestamp(now));
        }
        assert_eq!(
            w.next_opening(Timestamp(i64::MAX)),
            Opening::At(Timestamp(i64::MAX))
        );
    }

    #[test]
    fn whole_day_skipped_by_a_zone_has_no_opening() {
        // Samoa skipped Friday 2011-12-30 entirely (UTC-10 -> UTC+14).
        let w = window(json!({
            "days": ["fri", "sat"], "from": "09:00", "to": "17:00", "tz": "Pacific/Apia"
        }));
        assert_eq!(
            w.next_opening(rfc("2011-12-29T20:00:00-10:00")),
            Opening::At(rfc("2011-12-31T09:00:00+14:00"))
        );
    }

    const TZS: [&str; 15] = [
        "America/New_York",
        "Europe/Dublin",
        "America/Havana",
        "Antarctica/Troll",
        "Asia/Kathmandu",
        "America/Santiago",
        "Europe/London",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "America/Sao_Paulo",
        "Pacific/Apia",
        "Asia/Tehran",
        "America/St_Johns",
        "UTC",
    ];

    fn arb_window() -> impl Strategy<Value = BusinessWindow> {
        (
            proptest::array::uniform7(any::<bool>()),
            0u32..7,
            0u32..END_OF_DAY,
            1u32..=END_OF_DAY,
            // Mostly zones with interesting transitions, and any zone chrono-tz knows.
            prop_oneof![
                3 => proptest::sample::select(TZS.map(|n| n.parse::<Tz>().unwrap()).to_vec()),
                1 => proptest::sample::select(chrono_tz::TZ_VARIANTS.to_vec()),
            ],
        )
            .prop_map(|(mut days, forced, a, b, tz)| {
                days[forced as usize] = true;
                let (from, to) = if a < b { (a, b) } else { (b - 1, a + 1) };
                BusinessWindow {
                    days,
                    from_minute: from.min(END_OF_DAY - 1),
                    to_minute: to.min(END_OF_DAY),
                    tz,
                }
            })
    }

    /// `t` is where an opening of `w` starts: a window day at `from`, or, when that local time
    /// was skipped, the first instant after the gap.
    fn is_opening_start(w: &BusinessWindow, t: Timestamp) -> Result<(), String> {
        let utc = DateTime::<Utc>::from_timestamp_millis(t.0).unwrap();
        let local = utc.with_timezone(&w.tz).naive_local();
        let weekday = local.weekday().num_days_from_monday() as usize;
        if !w.days[weekday] {
            return Err(format!("{local} ({}) is not a window day", local.weekday()));
        }
        let target = local_time(local.date(), w.from_minute).unwrap();
        match w.tz.from_local_datetime(&target) {
            chrono::LocalResult::Single(x) if x.timestamp_millis() == t.0 => Ok(()),
            chrono::LocalResult::Ambiguous(x, _) if x.timestamp_millis() == t.0 => Ok(()),
            chrono::LocalResult::None => {
                let before = (utc - TimeDelta::milliseconds(1))
                    .with_timezone(&w.tz)
                    .naive_local();
                if before < target && target < local {
                    Ok(())
                } else {
                    Err(format!("{local} is not the end of a gap over {target}"))
                }
            }
            other => Err(format!("{local} is not {target}: {other:?}")),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn next_opening_is_sound(
            w in arb_window(),
            // 1850..2100: local mean times with odd seconds, then a century and a half of
            // DST rules.
            now in -3_786_825_600_000i64..4_102_444_800_000,
        ) {
            let now = Timestamp(now);
            match w.next_opening(now) {
                Opening::OpenNow { closes_at } => {
                    prop_assert!(closes_at > now);
                    prop_assert!(closes_at.0 - now.0 <= DAY_MS + 3 * 60 * 60 * 1000);
                    // It stays open until then, and it is still the same opening just before.
                    prop_assert_eq!(
                        w.next_opening(closes_at.plus_millis(-1)),
                        Opening::OpenNow { closes_at }
                    );
                }
                Opening::At(t) => {
                    prop_assert!(t > now, "{:?} before {:?}", t, now);
                    prop_assert!(t.0 - now.0 <= HORIZON_DAYS * DAY_MS);
                    if let Err(e) = is_opening_start(&w, t) {
                        return Err(TestCaseError::fail(format!("{w:?} at {now:?}: {e}")));
                    }
                    // Closed all the way to `t`, and open at `t`.
                    let mid = Timestamp(now.0 + (t.0 - now.0) / 2);
                    prop_assert_eq!(w.next_opening(mid), Opening::At(t));
                    prop_assert_eq!(w.next_opening(t.plus_millis(-1)), Opening::At(t));
                    let open = matches!(w.next_opening(t), Opening::OpenNow { .. });
                    prop_assert!(open);
                }
            }
        }

        #[test]
        fn canonical_json_parses_back(w in arb_window()) {
            prop_assert_eq!(BusinessWindow::parse(&w.to_json(), "$"), Ok(w));
        }
    }
}
