//! Time as the domain sees it: milliseconds since the Unix epoch, always passed in.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC). The domain never reads a clock; callers pass `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This instant plus a number of milliseconds, saturating instead of overflowing.
    pub fn plus_millis(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// RFC 3339 in UTC with milliseconds (`2026-12-06T19:54:42.029Z`), exactly as chrono's
    /// `to_rfc3339_opts(SecondsFormat::Millis, true)` writes it, its extended form for the
    /// years outside 0000–9999 included; `None` only outside chrono's range.
    pub fn rfc3339(self) -> Option<String> {
        self.rfc3339_millis().or_else(|| {
            chrono::DateTime::from_timestamp_millis(self.0)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
    }

    /// [`Timestamp::rfc3339`] for the years 0000–9999, written directly: every instance view
    /// carries a dozen times, and chrono's general formatter cost several times as much.
    fn rfc3339_millis(self) -> Option<String> {
        // The years 0000 and 9999: from -62,167,219,200,000 to 253,402,300,799,999 ms.
        const MIN: i64 = -62_167_219_200_000;
        const MAX: i64 = 253_402_300_799_999;
        if !(MIN..=MAX).contains(&self.0) {
            return None;
        }
        let days = self.0.div_euclid(86_400_000);
        let in_day = self.0.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
        let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
        let mut out = [0u8; 24];
        let mut put = |at: usize, value: i64, width: usize| {
            let mut v = value;
            for i in (0..width).rev() {
                // In range: every field is non-negative and below 10^width.
                out[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, year, 4);
        put(5, month, 2);
        put(8, day, 2);
        put(11, hour, 2);
        put(14, minute, 2);
        put(17, second, 2);
        put(20, milli, 3);
        for (at, sep) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            out[at] = sep;
        }
        out[23] = b'Z';
        String::from_utf8(out.to_vec()).ok()
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chrono_form(ms: i64) -> Option<String> {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }

    #[test]
    fn known_instants() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_796_586_882_029, "2026-12-06T19:54:42.029Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (-62_167_219_200_000, "0000-01-01T00:00:00.000Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(
                Timestamp(ms).rfc3339_millis().as_deref(),
                Some(text),
                "{ms}"
            );
            assert_eq!(chrono_form(ms).as_deref(), Some(text), "{ms}");
        }
        assert_eq!(Timestamp(-62_167_219_200_001).rfc3339_millis(), None);
        assert_eq!(Timestamp(253_402_300_800_000).rfc3339_millis(), None);
        assert_eq!(Timestamp(i64::MIN).rfc3339_millis(), None);
        assert_eq!(Timestamp(i64::MAX).rfc3339_millis(), None);
        // Outside 0000–9999, chrono's extended form.
        let far = 253_402_300_800_000;
        assert_eq!(Timestamp(far).rfc3339(), chrono_form(far));
        assert!(Timestamp(far)
            .rfc3339()
            .is_some_and(|s| s.starts_with("+10000-")));
        assert_eq!(Timestamp(i64::MAX).rfc3339(), None);
    }

    proptest! {
        #[test]
        fn formats_as_chrono_does(ms in -62_167_219_200_000i64..=253_402_300_799_999) {
            prop_assert_eq!(Timestamp(ms).rfc3339_millis(), chrono_form(ms));
        }

        #[test]
        fn formats_recent_times_as_chrono_does(ms in 0i64..4_102_444_800_000) {
            prop_assert_eq!(Timestamp(ms).rfc3339_millis(), chrono_form(ms));
        }
    }
}
