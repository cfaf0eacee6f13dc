//! Export options: typed, validated, with the error each bad value gets.
//! Pure Rust; [`OptionError::raise`] makes a rejected value `22023`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Output compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The level used when none is given: gzip's own default, and zstd's
    /// (3: what the `zstd` tool and library use; on NDJSON it is about as
    /// fast as gzip -1 and smaller than gzip -6).
    pub fn default_level(self) -> u32 {
        match self {
            Compression::None | Compression::Gzip => 6,
            Compression::Zstd => 3,
        }
    }

    /// The levels the codec takes (no compression takes gzip's, as before
    /// zstd, so that a level given without a codec stays accepted).
    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::None | Compression::Gzip => 0..=9,
            Compression::Zstd => 1..=19,
        }
    }

    /// What a file name ends with after `.ndjson`.
    pub fn file_suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }
}

impl FromStr for Compression {
    type Err = OptionError;

    fn from_str(value: &str) -> Result<Self, OptionError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(OptionError::new(
                format!("invalid value for compression: \"{value}\""),
                "allowed values are 'none', 'gzip' and 'zstd'",
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// A rejected option value: the message names the option, the hint says
/// what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub message: String,
    pub hint: String,
}

impl OptionError {
    fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        OptionError {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// Raise it: every rejected option value is `22023`
    /// invalid_parameter_value, wherever it was given.
    pub fn raise(self) -> ! {
        crate::error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            self.message,
            Some(&self.hint),
        )
    }
}

/// Rows per fetch: adaptive, or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSize {
    /// Aim at [`BatchSize::TARGET_BYTES`] per batch from the observed row width.
    Auto,
    Fixed(u32),
}

impl BatchSize {
    pub const TARGET_BYTES: usize = 1 << 20;
    pub const AUTO_MIN: u32 = 100;
    pub const AUTO_MAX: u32 = 10_000;
    pub const FIXED_MAX: u32 = 1_000_000;
    /// The first automatic batch, before any row width is known.
    pub const AUTO_FIRST: u32 = 100;

    /// Rows for the next batch given the average encoded row width so far.
    pub fn rows(&self, average_row_bytes: Option<usize>) -> u32 {
        match *self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => match average_row_bytes {
                None => Self::AUTO_FIRST,
                Some(width) => {
                    let rows = Self::TARGET_BYTES / width.max(1);
                    (rows.min(u32::MAX as usize) as u32).clamp(Self::AUTO_MIN, Self::AUTO_MAX)
                }
            },
        }
    }
}

/// Everything an export can be asked for, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportOptions {
    pub compression: Compression,
    pub compression_level: u32,
    pub key: Option<String>,
    pub after: Option<String>,
    pub batch_size: BatchSize,
    pub footer: bool,
    pub key_from: Option<String>,
    pub key_to: Option<String>,
    /// One JSON array instead of NDJSON lines (see `sink::array`).
    pub force_array: bool,
    /// How values of a few types are written.
    pub style: JsonStyle,
}

/// How values of a few types are written; all off (the default) is
/// `row_to_json`'s output. They apply inside arrays and composites too;
/// json and jsonb values are never touched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonStyle {
    /// int8 as a JSON string: `"9007199254740993"`.
    pub bigint_as_string: bool,
    /// numeric as a JSON string of its text form: `"12.50"`, `"NaN"`.
    pub numeric_as_string: bool,
    /// timestamptz in UTC with `Z`, whatever the session's TimeZone.
    pub timestamptz_utc: bool,
    /// bytea as standard base64 (with padding) instead of `\x` hex.
    pub bytea_base64: bool,
    /// Leave out the row's top-level keys whose value is NULL.
    pub omit_nulls: bool,
}

impl JsonStyle {
    /// The `javascript` profile: values `JSON.parse` reads without loss.
    pub const JAVASCRIPT: JsonStyle = JsonStyle {
        bigint_as_string: true,
        numeric_as_string: true,
        timestamptz_utc: true,
        bytea_base64: true,
        omit_nulls: false,
    };

    /// The profile named `profile`, then each option given on top of it.
    pub fn from_raw(raw: &RawOptions<'_>) -> Result<JsonStyle, OptionError> {
        let mut style = match raw.profile.map(str::to_ascii_lowercase).as_deref() {
            None | Some("default") => JsonStyle::default(),
            Some("javascript") => JsonStyle::JAVASCRIPT,
            Some(_) => {
                return Err(OptionError::new(
                    format!(
                        "invalid value for profile: \"{}\"",
                        raw.profile.unwrap_or("")
                    ),
                    "profile must be 'default' (row_to_json's output) or 'javascript'",
                ))
            }
        };
        for (field, value) in [
            (&mut style.bigint_as_string, raw.bigint_as_string),
            (&mut style.numeric_as_string, raw.numeric_as_string),
            (&mut style.timestamptz_utc, raw.timestamptz_utc),
            (&mut style.bytea_base64, raw.bytea_base64),
            (&mut style.omit_nulls, raw.omit_nulls),
        ] {
            if let Some(value) = value {
                *field = value;
            }
        }
        Ok(style)
    }

    /// Every option's name, in the order [`JsonStyle::names`] uses.
    pub const ALL_NAMES: [&'static str; 5] = [
        "bigint_as_string",
        "numeric_as_string",
        "timestamptz_utc",
        "bytea_base64",
        "omit_nulls",
    ];

    /// The options that are on, by name.
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("bigint_as_string", self.bigint_as_string),
            ("numeric_as_string", self.numeric_as_string),
            ("timestamptz_utc", self.timestamptz_utc),
            ("bytea_base64", self.bytea_base64),
            ("omit_nulls", self.omit_nulls),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect()
    }
}

/// Options as they come from SQL, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawOptions<'a> {
    pub compression: Option<&'a str>,
    pub compression_level: Option<i32>,
    pub key: Option<&'a str>,
    pub after: Option<&'a str>,
    pub batch_size: Option<i32>,
    pub footer: Option<bool>,
    pub key_from: Option<&'a str>,
    pub key_to: Option<&'a str>,
    pub force_array: Option<bool>,
    pub profile: Option<&'a str>,
    pub bigint_as_string: Option<bool>,
    pub numeric_as_string: Option<bool>,
    pub timestamptz_utc: Option<bool>,
    pub bytea_base64: Option<bool>,
    pub omit_nulls: Option<bool>,
}

pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
pub const CHUNK_SIZE_MIN: usize = 1024;
/// The largest chunk a `bytea` value can hold comfortably (1 GB; a value
/// holds at most 1 GiB less a few bytes).
pub const CHUNK_SIZE_MAX: usize = 1_000_000_000;

impl ExportOptions {
    pub fn parse(raw: &RawOptions<'_>) -> Result<ExportOptions, OptionError> {
        let compression = match raw.compression {
            Some(value) => value.parse()?,
            None => Compression::None,
        };
        let compression_level = match raw.compression_level {
            None => compression.default_level(),
            Some(level) if compression.levels().contains(&level) => level as u32,
            Some(level) => {
                let levels = compression.levels();
                return Err(OptionError::new(
                    format!("invalid value for compression_level: {level}"),
                    format!(
                        "compression_level must be between {} and {} for compression '{}'",
                        levels.start(),
                        levels.end(),
                        if compression == Compression::None {
                            Compression::Gzip
                        } else {
                            compression
                        }
                    ),
                ));
            }
        };
        let batch_size = match raw.batch_size {
            None | Some(0) => BatchSize::Auto,
            Some(n) if n > 0 && (n as u32) <= BatchSize::FIXED_MAX => BatchSize::Fixed(n as u32),
            Some(n) => {
                return Err(OptionError::new(
                    format!("invalid value for batch_size: {n}"),
                    format!(
                        "batch_size must be 0 (automatic) or between 1 and {}",
                        BatchSize::FIXED_MAX
                    ),
                ))
            }
        };
        let key = match raw.key {
            Some("") => {
                return Err(OptionError::new(
                    "key must not be empty",
                    "name a column of the source",
                ))
            }
            other => other.map(str::to_owned),
        };
        for (name, value) in [
            ("after", raw.after),
            ("key_from", raw.key_from),
            ("key_to", raw.key_to),
        ] {
            if value.is_some() && key.is_none() {
                return Err(OptionError::new(
                    format!("{name} needs key"),
                    "name the key column with key => 'column'",
                ));
            }
        }
        Ok(ExportOptions {
            compression,
            compression_level,
            key,
            after: raw.after.map(str::to_owned),
            batch_size,
            footer: raw.footer.unwrap_or(false),
            key_from: raw.key_from.map(str::to_owned),
            key_to: raw.key_to.map(str::to_owned),
            force_array: raw.force_array.unwrap_or(false),
            style: JsonStyle::from_raw(raw)?,
        })
    }
}

impl ExportOptions {
    /// The options that shape the output, as `name=value` words, for the
    /// activity view and the audit line (a resume token is not shown).
    pub fn describe(&self) -> String {
        let mut words = format!(
            "format={} compression={}",
            if self.force_array {
                "json-array"
            } else {
                "ndjson"
            },
            self.compression
        );
        if self.compression != Compression::None {
            words.push_str(&format!(":{}", self.compression_level));
        }
        words.push_str(&format!(" footer={}", self.footer));
        for (name, value) in [
            ("key", &self.key),
            ("key_from", &self.key_from),
            ("key_to", &self.key_to),
        ] {
            if let Some(value) = value {
                words.push_str(&format!(" {name}={value:?}"));
            }
        }
        if self.after.is_some() {
            words.push_str(" after=<token>");
        }
        for name in self.style.names() {
            words.push_str(&format!(" {name}=true"));
        }
        words
    }
}

/// Validate `chunk_size` for the byte-stream export.
pub fn parse_chunk_size(value: Option<i32>) -> Result<usize, OptionError> {
    match value {
        None => Ok(DEFAULT_CHUNK_SIZE),
        Some(n) if n >= CHUNK_SIZE_MIN as i32 && n as usize <= CHUNK_SIZE_MAX => Ok(n as usize),
        Some(n) => Err(OptionError::new(
            format!("invalid value for chunk_size: {n}"),
            format!("chunk_size must be between {CHUNK_SIZE_MIN} and {CHUNK_SIZE_MAX} bytes"),
        )),
    }
}

/// Validate `chunk_rows` (rows per committed chunk of a chunked export or
/// an archive): at least 1; `default` when NULL.
pub fn parse_chunk_rows(value: Option<i64>, default: u64) -> Result<u64, OptionError> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 => Ok(n as u64),
        Some(n) => Err(OptionError::new(
            format!("invalid value for chunk_rows: {n}"),
            "chunk_rows must be at least 1",
        )),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn parse(raw: RawOptions<'_>) -> Result<ExportOptions, OptionError> {
        ExportOptions::parse(&raw)
    }

    #[test]
    fn chunk_rows_are_at_least_one() {
        assert_eq!(parse_chunk_rows(None, 7).unwrap(), 7);
        assert_eq!(parse_chunk_rows(Some(1), 7).unwrap(), 1);
        for bad in [0, -1, i64::MIN] {
            assert!(parse_chunk_rows(Some(bad), 7).is_err());
        }
    }

    #[test]
    fn describe_names_what_shapes_the_output() {
        let plain = parse(RawOptions::default()).unwrap();
        assert_eq!(
            plain.describe(),
            "format=ndjson compression=none footer=false"
        );
        let keyed = parse(RawOptions {
            compression: Some("gzip"),
            compression_level: Some(9),
            key: Some("id"),
            after: Some("token"),
            key_to: Some("100"),
            footer: Some(true),
            force_array: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            keyed.describe(),
            r#"format=json-array compression=gzip:9 footer=true key="id" key_to="100" after=<token>"#
        );
    }

    #[test]
    fn defaults() {
        let o = parse(RawOptions::default()).unwrap();
        assert_eq!(o.compression, Compression::None);
        assert_eq!(o.compression_level, 6);
        assert_eq!(o.batch_size, BatchSize::Auto);
        assert!(!o.footer);
        assert_eq!(o.key, None);
    }

    #[test]
    fn compression_values() {
        assert_eq!("GZIP".parse::<Compression>().unwrap(), Compression::Gzip);
        assert_eq!(" none ".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!(" Zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        let err = "lz4".parse::<Compression>().unwrap_err();
        assert!(err.message.contains("compression") && err.message.contains("lz4"));
        assert!(err.hint.contains("gzip") && err.hint.contains("zstd"));
    }

    #[test]
    fn levels_and_batch_sizes_are_bounded() {
        for level in [0, 9] {
            assert!(parse(RawOptions {
                compression_level: Some(level),
                ..Default::default()
            })
            .is_ok());
        }
        for level in [-1, 10] {
            let err = parse(RawOptions {
                compression_level: Some(level),
                ..Default::default()
            })
            .unwrap_err();
            assert!(err.message.contains("compression_level"));
        }
        for (level, ok) in [(0, false), (1, true), (19, true), (20, false)] {
            let parsed = parse(RawOptions {
                compression: Some("zstd"),
                compression_level: Some(level),
                ..Default::default()
            });
            assert_eq!(parsed.is_ok(), ok, "zstd level {level}");
            if let Err(err) = parsed {
                assert!(err.hint.contains("between 1 and 19"), "{}", err.hint);
            }
        }
        let zstd = parse(RawOptions {
            compression: Some("zstd"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(zstd.compression_level, 3);
        let err = parse(RawOptions {
            batch_size: Some(-5),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.message.contains("batch_size"));
        assert!(parse(RawOptions {
            batch_size: Some(1_000_001),
            ..Default::default()
        })
        .is_err());
        assert_eq!(
            parse(RawOptions {
                batch_size: Some(500),
                ..Default::default()
            })
            .unwrap()
            .batch_size,
            BatchSize::Fixed(500)
        );
    }

    #[test]
    fn keyset_options_need_a_key() {
        for raw in [
            RawOptions {
                after: Some("t"),
                ..Default::default()
            },
            RawOptions {
                key_from: Some("1"),
                ..Default::default()
            },
            RawOptions {
                key_to: Some("1"),
                ..Default::default()
            },
        ] {
            assert!(parse(raw).unwrap_err().message.contains("needs key"));
        }
        assert!(parse(RawOptions {
            key: Some(""),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn automatic_batch_size_follows_row_width() {
        let auto = BatchSize::Auto;
        assert_eq!(auto.rows(None), 100);
        assert_eq!(auto.rows(Some(300)), 3495);
        assert_eq!(auto.rows(Some(10)), 10_000);
        assert_eq!(auto.rows(Some(1 << 20)), 100);
        assert_eq!(BatchSize::Fixed(7).rows(Some(1)), 7);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(None).unwrap(), 1 << 20);
        assert!(parse_chunk_size(Some(100)).is_err());
        assert_eq!(parse_chunk_size(Some(4096)).unwrap(), 4096);
        assert!(parse_chunk_size(Some(1_000_000_000)).is_ok());
        assert!(parse_chunk_size(Some(1_000_000_001)).is_err());
        assert!(parse_chunk_size(Some(i32::MAX)).is_err());
    }
}
