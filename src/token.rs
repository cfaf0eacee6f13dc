//! Resume tokens: an opaque, URL-safe base64 string that says where an
//! export stopped. It carries the format version, a fingerprint of the
//! export (source and key), the key column, the last exported key value
//! (its text form, or none before the first row) and the rows so far, and
//! ends with a CRC-32 of all of that so that an altered token is refused.
//!
//! Version 2 holds the key's text as rendered under fixed settings (see
//! `gucs::with_key_text_settings`), so it reads back exactly in any
//! session; version 1 held it in the exporting session's settings and is
//! still decoded, for the caller to accept only where that was exact.
//! Pure Rust: no SQL is built from it (the key value is bound as a
//! parameter by the caller).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

const MAGIC: &[u8; 3] = b"PSE";
pub const TOKEN_VERSION: u8 = 2;
/// The oldest version still decoded.
const OLDEST_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    pub fingerprint: u64,
    pub key_column: String,
    /// Text form of the last exported key; `None` before the first row.
    pub last_key: Option<String>,
    pub rows: u64,
    /// The format version the token was written in.
    pub version: u8,
}

/// Why a token was refused; the message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    NotBase64,
    Truncated,
    NotAToken,
    Version(u8),
    Checksum,
    BadText,
    TrailingBytes,
    OtherExport,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::NotBase64 => write!(f, "invalid resume token: not URL-safe base64"),
            TokenError::Truncated => write!(f, "invalid resume token: truncated"),
            TokenError::NotAToken => {
                write!(f, "invalid resume token: not a pg_stream_export token")
            }
            TokenError::Version(v) => write!(f, "invalid resume token: unsupported version {v}"),
            TokenError::Checksum => write!(
                f,
                "invalid resume token: checksum mismatch (the token was altered)"
            ),
            TokenError::BadText => write!(f, "invalid resume token: key text is not valid UTF-8"),
            TokenError::TrailingBytes => write!(
                f,
                "invalid resume token: unexpected bytes after the checksum"
            ),
            TokenError::OtherExport => {
                write!(
                    f,
                    "invalid resume token: it belongs to another export (different source or key)"
                )
            }
        }
    }
}

/// FNV-1a, 64 bits: a stable fingerprint of (source, key).
pub fn fingerprint(source: &str, key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in source.as_bytes().iter().chain(&[0u8]).chain(key.as_bytes()) {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(bytes);
    crc.finalize()
}

impl ResumeToken {
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(MAGIC);
        bytes.push(self.version);
        bytes.extend_from_slice(&self.fingerprint.to_be_bytes());
        bytes.extend_from_slice(&self.rows.to_be_bytes());
        bytes.extend_from_slice(&(self.key_column.len() as u32).to_be_bytes());
        bytes.extend_from_slice(self.key_column.as_bytes());
        match &self.last_key {
            None => bytes.push(0),
            Some(key) => {
                bytes.push(1);
                bytes.extend_from_slice(&(key.len() as u32).to_be_bytes());
                bytes.extend_from_slice(key.as_bytes());
            }
        }
        let crc = crc32(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(token: &str) -> Result<ResumeToken, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::NotBase64)?;
        if bytes.len() < MAGIC.len() + 1 {
            return Err(if MAGIC.starts_with(&bytes) {
                TokenError::Truncated
            } else {
                TokenError::NotAToken
            });
        }
        if &bytes[..3] != MAGIC {
            return Err(TokenError::NotAToken);
        }
        let version = bytes[3];
        if !(OLDEST_VERSION..=TOKEN_VERSION).contains(&version) {
            return Err(TokenError::Version(version));
        }
        let mut reader = Reader {
            bytes: &bytes,
            at: 4,
        };
        let fingerprint = u64::from_be_bytes(reader.take_array()?);
        let rows = u64::from_be_bytes(reader.take_array()?);
        let key_len = u32::from_be_bytes(reader.take_array()?) as usize;
        let key_column = reader.take_text(key_len)?;
        let last_key = match reader.take_array::<1>()?[0] {
            0 => None,
            1 => {
                let len = u32::from_be_bytes(reader.take_array()?) as usize;
                Some(reader.take_text(len)?)
            }
            _ => return Err(TokenError::Checksum),
        };
        let body_end = reader.at;
        let crc = u32::from_be_bytes(reader.take_array()?);
        if crc != crc32(&bytes[..body_end]) {
            return Err(TokenError::Checksum);
        }
        if reader.at != bytes.len() {
            return Err(TokenError::TrailingBytes);
        }
        Ok(ResumeToken {
            fingerprint,
            key_column,
            last_key,
            rows,
            version,
        })
    }

    /// Refuse a token made by another export.
    pub fn check_belongs_to(&self, fingerprint: u64, key_column: &str) -> Result<(), TokenError> {
        if self.fingerprint != fingerprint || self.key_column != key_column {
            return Err(TokenError::OtherExport);
        }
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], TokenError> {
        let end = self.at.checked_add(n).ok_or(TokenError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(TokenError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn take_text(&mut self, n: usize) -> Result<String, TokenError> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes).map_err(|_| TokenError::BadText)
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn sample() -> ResumeToken {
        ResumeToken {
            fingerprint: fingerprint("\"public\".\"events\"", "id"),
            key_column: "id".into(),
            last_key: Some("12345".into()),
            rows: 12345,
            version: TOKEN_VERSION,
        }
    }

    #[test]
    fn round_trips() {
        for token in [
            sample(),
            ResumeToken {
                last_key: None,
                rows: 0,
                ..sample()
            },
            ResumeToken {
                version: 1,
                ..sample()
            },
            ResumeToken {
                last_key: Some("it's; DROP TABLE x; --\"é".into()),
                ..sample()
            },
        ] {
            let text = token.encode();
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(ResumeToken::decode(&text).unwrap(), token);
        }
    }

    #[test]
    fn refuses_bad_tokens_saying_why() {
        let good = sample().encode();
        assert_eq!(
            ResumeToken::decode("not base64!"),
            Err(TokenError::NotBase64)
        );
        assert_eq!(
            ResumeToken::decode(&good[..good.len() - 6]),
            Err(TokenError::Truncated)
        );
        assert_eq!(
            ResumeToken::decode(&URL_SAFE_NO_PAD.encode(b"hello world")),
            Err(TokenError::NotAToken)
        );
        // Flip one character in the middle: the checksum catches it.
        let mut altered = good.clone().into_bytes();
        let mid = altered.len() / 2;
        altered[mid] = if altered[mid] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(matches!(
            ResumeToken::decode(&altered),
            Err(TokenError::Checksum | TokenError::Truncated)
        ));
        let mut longer = URL_SAFE_NO_PAD.decode(&good).unwrap();
        longer.push(0);
        assert_eq!(
            ResumeToken::decode(&URL_SAFE_NO_PAD.encode(longer)),
            Err(TokenError::TrailingBytes)
        );
        let mut version = URL_SAFE_NO_PAD.decode(&good).unwrap();
        version[3] = 9;
        assert_eq!(
            ResumeToken::decode(&URL_SAFE_NO_PAD.encode(version)),
            Err(TokenError::Version(9))
        );
    }

    #[test]
    fn tokens_belong_to_one_export() {
        let token = sample();
        assert!(token
            .check_belongs_to(fingerprint("\"public\".\"events\"", "id"), "id")
            .is_ok());
        assert_eq!(
            token.check_belongs_to(fingerprint("\"public\".\"other\"", "id"), "id"),
            Err(TokenError::OtherExport)
        );
        assert_ne!(fingerprint("a", "bc"), fingerprint("ab", "c"));
    }
}
