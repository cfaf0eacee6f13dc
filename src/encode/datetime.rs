//! Dates and timestamps as `to_json` renders them: ISO 8601 with `T`
//! (PostgreSQL's XSD style), fractional seconds without trailing zeros,
//! `" BC"` for years before 1, `infinity` / `-infinity` for the specials.

/// Microseconds per day and friends, as in PostgreSQL.
const USECS_PER_SEC: i64 = 1_000_000;
const USECS_PER_MINUTE: i64 = 60 * USECS_PER_SEC;
const USECS_PER_HOUR: i64 = 60 * USECS_PER_MINUTE;
const USECS_PER_DAY: i64 = 24 * USECS_PER_HOUR;
/// Julian day of 2000-01-01, PostgreSQL's epoch.
const POSTGRES_EPOCH_JDATE: i64 = 2_451_545;

/// Broken-down time, as PostgreSQL's `pg_tm` plus fractional microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tm {
    pub year: i32,
    pub month: i32,
    pub day: i32,
    pub hour: i32,
    pub minute: i32,
    pub second: i32,
    pub fsec: i32,
}

/// PostgreSQL's `j2date`: Julian day number to (year, month, day).
pub fn j2date(jd: i32) -> (i32, i32, i32) {
    let mut julian = jd as u32;
    julian = julian.wrapping_add(32044);
    let mut quad = julian / 146097;
    let extra = (julian - quad * 146097) * 4 + 3;
    julian += 60 + quad * 3 + extra / 146097;
    quad = julian / 1461;
    julian -= quad * 1461;
    let mut y = (julian * 4 / 1461) as i32;
    julian = if y != 0 {
        (julian + 305) % 365
    } else {
        (julian + 306) % 366
    } + 123;
    y += (quad * 4) as i32;
    let year = y - 4800;
    let quad = julian * 2141 / 65536;
    let day = (julian - 7834 * quad / 256) as i32;
    let month = ((quad + 10) % 12 + 1) as i32;
    (year, month, day)
}

/// Split a timestamp (microseconds since 2000-01-01, already shifted to
/// local time) into fields. `None` when out of the Julian-day range, which
/// PostgreSQL reports as "timestamp out of range".
pub fn timestamp_to_tm(timestamp: i64) -> Option<Tm> {
    let mut date = timestamp.div_euclid(USECS_PER_DAY);
    let mut time = timestamp.rem_euclid(USECS_PER_DAY);
    if time < 0 {
        time += USECS_PER_DAY;
        date -= 1;
    }
    date += POSTGRES_EPOCH_JDATE;
    if date < 0 || date > i32::MAX as i64 {
        return None;
    }
    let (year, month, day) = j2date(date as i32);
    let hour = time / USECS_PER_HOUR;
    time -= hour * USECS_PER_HOUR;
    let minute = time / USECS_PER_MINUTE;
    time -= minute * USECS_PER_MINUTE;
    let second = time / USECS_PER_SEC;
    let fsec = time - second * USECS_PER_SEC;
    Some(Tm {
        year,
        month,
        day,
        hour: hour as i32,
        minute: minute as i32,
        second: second as i32,
        fsec: fsec as i32,
    })
}

/// `pg_ultostr_zeropad`: at least `width` digits.
fn push_zeropad(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(value).as_bytes();
    for _ in digits.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits);
}

fn push_date_part(out: &mut Vec<u8>, tm: &Tm) {
    let year = if tm.year > 0 { tm.year } else { -(tm.year - 1) };
    push_zeropad(out, year as u32, 4);
    out.push(b'-');
    push_zeropad(out, tm.month as u32, 2);
    out.push(b'-');
    push_zeropad(out, tm.day as u32, 2);
}

/// PostgreSQL's `AppendSeconds` with precision 6 and zero fill.
fn push_seconds(out: &mut Vec<u8>, second: i32, fsec: i32) {
    push_zeropad(out, second.unsigned_abs(), 2);
    if fsec != 0 {
        let mut digits = [b'0'; 6];
        let mut value = fsec.unsigned_abs();
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        let len = 6 - digits.iter().rev().take_while(|&&d| d == b'0').count();
        out.push(b'.');
        out.extend_from_slice(&digits[..len]);
    }
}

/// PostgreSQL's `EncodeTimezone` in XSD style; `tz` is seconds west of UTC.
fn push_timezone(out: &mut Vec<u8>, tz: i32) {
    let mut sec = tz.unsigned_abs();
    let mut min = sec / 60;
    sec -= min * 60;
    let hour = min / 60;
    min -= hour * 60;
    out.push(if tz <= 0 { b'+' } else { b'-' });
    push_zeropad(out, hour, 2);
    out.push(b':');
    push_zeropad(out, min, 2);
    if sec != 0 {
        out.push(b':');
        push_zeropad(out, sec, 2);
    }
}

fn push_bc(out: &mut Vec<u8>, tm: &Tm) {
    if tm.year <= 0 {
        out.extend_from_slice(b" BC");
    }
}

/// A `date` (days since 2000-01-01) without quotes.
pub fn push_date(out: &mut Vec<u8>, days: i32) {
    match days {
        i32::MIN => out.extend_from_slice(b"-infinity"),
        i32::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            let (year, month, day) = j2date((days as i64 + POSTGRES_EPOCH_JDATE) as i32);
            let tm = Tm {
                year,
                month,
                day,
                ..Tm::default()
            };
            push_date_part(out, &tm);
            push_bc(out, &tm);
        }
    }
}

/// Append the infinities; true when `timestamp` was one.
pub fn push_special_timestamp(out: &mut Vec<u8>, timestamp: i64) -> bool {
    match timestamp {
        i64::MIN => out.extend_from_slice(b"-infinity"),
        i64::MAX => out.extend_from_slice(b"infinity"),
        _ => return false,
    }
    true
}

/// A broken-down timestamp without quotes, with the zone offset `tz`
/// (seconds west of UTC) when given.
pub fn push_timestamp_tm(out: &mut Vec<u8>, tm: &Tm, tz: Option<i32>) {
    push_date_part(out, tm);
    out.push(b'T');
    push_zeropad(out, tm.hour as u32, 2);
    out.push(b':');
    push_zeropad(out, tm.minute as u32, 2);
    out.push(b':');
    push_seconds(out, tm.second, tm.fsec);
    if let Some(tz) = tz {
        push_timezone(out, tz);
    }
    push_bc(out, tm);
}

/// A `timestamp` (no zone). False when out of range.
pub fn push_timestamp(out: &mut Vec<u8>, timestamp: i64) -> bool {
    if push_special_timestamp(out, timestamp) {
        return true;
    }
    match timestamp_to_tm(timestamp) {
        Some(tm) => {
            push_timestamp_tm(out, &tm, None);
            true
        }
        None => false,
    }
}

/// A `timestamptz` shown in a zone with the fixed offset `gmtoff` seconds
/// east of UTC. False when out of range.
pub fn push_timestamptz_fixed(out: &mut Vec<u8>, timestamp: i64, gmtoff: i32) -> bool {
    if push_special_timestamp(out, timestamp) {
        return true;
    }
    match timestamp
        .checked_add(gmtoff as i64 * USECS_PER_SEC)
        .and_then(timestamp_to_tm)
    {
        Some(tm) => {
            push_timestamp_tm(out, &tm, Some(-gmtoff));
            true
        }
        None => false,
    }
}

/// timestamptz in UTC, as `row_to_json` writes it under `TimeZone = UTC`
/// but with `Z` for the `+00:00` offset (before a ` BC` suffix);
/// infinities as they are. False when out of range.
pub fn push_timestamptz_utc(out: &mut Vec<u8>, timestamp: i64) -> bool {
    let start = out.len();
    if !push_timestamptz_fixed(out, timestamp, 0) {
        return false;
    }
    if let Some(at) = memchr::memmem::find(&out[start..], b"+00:00") {
        let at = start + at;
        out.splice(at..at + 6, [b'Z']);
    }
    true
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn utc(timestamp: i64) -> String {
        let mut out = Vec::new();
        assert!(push_timestamptz_utc(&mut out, timestamp));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timestamptz_utc_ends_in_z() {
        // Microseconds since 2000-01-01 00:00:00 UTC.
        assert_eq!(utc(0), "2000-01-01T00:00:00Z");
        assert_eq!(utc(757_382_415_489_000), "2024-01-01T00:00:15.489Z");
        assert_eq!(utc(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(utc(i64::MAX), "infinity");
        assert_eq!(utc(i64::MIN), "-infinity");
        // 0001-01-01 00:00:00 BC: the offset comes before the era.
        assert_eq!(utc(-63_113_904_000_000_000), "0001-01-01T00:00:00Z BC");
    }

    fn ts(v: i64) -> String {
        let mut out = Vec::new();
        assert!(push_timestamp(&mut out, v));
        String::from_utf8(out).unwrap()
    }

    fn tstz(v: i64, gmtoff: i32) -> String {
        let mut out = Vec::new();
        assert!(push_timestamptz_fixed(&mut out, v, gmtoff));
        String::from_utf8(out).unwrap()
    }

    fn date(v: i32) -> String {
        let mut out = Vec::new();
        push_date(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "2000-01-01");
        assert_eq!(date(-1), "1999-12-31");
        assert_eq!(date(8766), "2024-01-01");
        assert_eq!(date(i32::MAX), "infinity");
        assert_eq!(date(i32::MIN), "-infinity");
        // 0001-01-01 is Julian day 1721426; the day before is 1 BC.
        assert_eq!(date(1721426 - 2451545), "0001-01-01");
        assert_eq!(date(1721425 - 2451545), "0001-12-31 BC");
    }

    #[test]
    fn timestamps() {
        assert_eq!(ts(0), "2000-01-01T00:00:00");
        assert_eq!(ts(15_123_000), "2000-01-01T00:00:15.123");
        assert_eq!(ts(-1), "1999-12-31T23:59:59.999999");
        assert_eq!(ts(1_000_010), "2000-01-01T00:00:01.00001");
        assert_eq!(ts(i64::MAX), "infinity");
        assert_eq!(ts(i64::MIN), "-infinity");
    }

    #[test]
    fn timestamptz_offsets() {
        assert_eq!(tstz(0, 0), "2000-01-01T00:00:00+00:00");
        assert_eq!(tstz(0, 19800), "2000-01-01T05:30:00+05:30");
        assert_eq!(tstz(0, -3600), "1999-12-31T23:00:00-01:00");
        assert_eq!(tstz(0, 3208), "2000-01-01T00:53:28+00:53:28");
    }
}
