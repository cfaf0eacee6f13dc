//! Object URIs: `s3://bucket/key`. Pure parsing, no I/O.

use std::fmt;

/// Is `text` meant as a URI (`scheme://...`) rather than a server path?
/// Server paths must be absolute, so a leading scheme is never a path.
pub fn looks_like_uri(text: &str) -> bool {
    match text.find("://") {
        Some(end) if end > 0 => {
            let scheme = &text[..end];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// A bucket and an object key (or key prefix) in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectUri {
    pub bucket: String,
    pub key: String,
}

/// Why a URI was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum UriError {
    /// A scheme other than `s3`.
    UnsupportedScheme(String),
    /// `s3://` with something wrong after it.
    Malformed(String),
}

impl fmt::Display for ObjectUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Bucket names as S3 accepts them: 3-63 characters of lowercase letters,
/// digits, dots and hyphens, beginning and ending with a letter or digit.
fn valid_bucket(bucket: &str) -> bool {
    let bytes = bucket.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && !bucket.contains("..")
}

impl ObjectUri {
    /// Parse `s3://bucket/key`. With `prefix`, the key names a "directory":
    /// it may be empty (the bucket's root) and gains a trailing `/`.
    pub fn parse(text: &str, prefix: bool) -> Result<ObjectUri, UriError> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(UriError::Malformed("expected s3://bucket/key".into()));
        };
        if !scheme.eq_ignore_ascii_case("s3") {
            return Err(UriError::UnsupportedScheme(scheme.to_string()));
        }
        if text.contains(['?', '#']) || text.chars().any(|c| c.is_control()) {
            return Err(UriError::Malformed(
                "query strings, fragments and control characters are not allowed".into(),
            ));
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') {
            return Err(UriError::Malformed(
                "credentials do not belong in the URI; the server's AWS configuration supplies them"
                    .into(),
            ));
        }
        if !valid_bucket(bucket) {
            return Err(UriError::Malformed(format!(
                "invalid bucket name \"{bucket}\""
            )));
        }
        let mut key = key.to_string();
        if prefix {
            if !key.is_empty() && !key.ends_with('/') {
                key.push('/');
            }
        } else if key.is_empty() || key.ends_with('/') {
            return Err(UriError::Malformed(
                "the URI names no object (empty key or trailing /)".into(),
            ));
        }
        if key.len() > 900 {
            return Err(UriError::Malformed(
                "the key is longer than 900 bytes".into(),
            ));
        }
        if key
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(UriError::Malformed(
                "\".\" and \"..\" are not allowed in a key".into(),
            ));
        }
        Ok(ObjectUri {
            bucket: bucket.to_string(),
            key,
        })
    }

    /// The object `name` under this prefix.
    pub fn join(&self, name: &str) -> ObjectUri {
        ObjectUri {
            bucket: self.bucket.clone(),
            key: format!("{}{}", self.key, name),
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn tells_uris_from_paths() {
        assert!(looks_like_uri("s3://b/k"));
        assert!(looks_like_uri("gs://b/k"));
        assert!(looks_like_uri("az+x://b"));
        assert!(!looks_like_uri("/tmp/s3://x"));
        assert!(!looks_like_uri("://x"));
        assert!(!looks_like_uri("relative/path"));
        assert!(!looks_like_uri("1s3://b/k"));
    }

    #[test]
    fn parses_objects_and_prefixes() {
        let uri = ObjectUri::parse("s3://my-bucket/a/b.ndjson.gz", false).unwrap();
        assert_eq!(uri.bucket, "my-bucket");
        assert_eq!(uri.key, "a/b.ndjson.gz");
        assert_eq!(uri.to_string(), "s3://my-bucket/a/b.ndjson.gz");
        assert_eq!(ObjectUri::parse("S3://bkt/x", false).unwrap().key, "x");
        assert_eq!(ObjectUri::parse("s3://bkt/dir", true).unwrap().key, "dir/");
        assert_eq!(ObjectUri::parse("s3://bkt/dir/", true).unwrap().key, "dir/");
        assert_eq!(ObjectUri::parse("s3://bkt", true).unwrap().key, "");
        assert_eq!(
            ObjectUri::parse("s3://bkt/dir", true)
                .unwrap()
                .join("manifest.json")
                .key,
            "dir/manifest.json"
        );
    }

    #[test]
    fn refuses_bad_uris() {
        assert_eq!(
            ObjectUri::parse("gs://b/k", false),
            Err(UriError::UnsupportedScheme("gs".into()))
        );
        for bad in [
            "s3://",
            "s3://bkt",
            "s3://bkt/",
            "s3://bkt/dir/",
            "s3://Upper/k",
            "s3://ab/k",
            "s3://-bkt/k",
            "s3://bk..t/k",
            "s3://user:secret@bkt/k",
            "s3://bkt/k?x=1",
            "s3://bkt/a/../k",
            "s3:/bkt/k",
        ] {
            assert!(
                matches!(ObjectUri::parse(bad, false), Err(UriError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
