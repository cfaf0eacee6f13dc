//! The footer line: `{"_stream_export":{"version":1,"rows":N,"bytes":B,
//! "crc32":"89abcdef","resume_token":"..."|null,"complete":true}}`.
//! `rows`, `bytes` and `crc32` cover the record lines before it (newlines
//! included), uncompressed. Pure Rust.

pub const FOOTER_VERSION: u32 = 1;
/// The key that marks a footer line; no record line of an export starts
/// with it unless a source has a column of that name.
pub const FOOTER_PREFIX: &str = "{\"_stream_export\":";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub rows: u64,
    pub bytes: u64,
    pub crc32: u32,
    pub resume_token: Option<String>,
}

impl Footer {
    /// The footer as one line, without the trailing newline.
    pub fn render(&self) -> String {
        let token = match &self.resume_token {
            // Tokens are URL-safe base64: nothing in them needs escaping.
            Some(token) => format!("\"{token}\""),
            None => "null".to_string(),
        };
        format!(
            "{FOOTER_PREFIX}{{\"version\":{FOOTER_VERSION},\"rows\":{},\"bytes\":{},\"crc32\":\"{:08x}\",\"resume_token\":{token},\"complete\":true}}}}",
            self.rows, self.bytes, self.crc32
        )
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn renders_the_documented_shape() {
        let footer = Footer {
            rows: 3,
            bytes: 42,
            crc32: 0x0abc_def0,
            resume_token: None,
        };
        assert_eq!(
            footer.render(),
            r#"{"_stream_export":{"version":1,"rows":3,"bytes":42,"crc32":"0abcdef0","resume_token":null,"complete":true}}"#
        );
        let with_token = Footer {
            resume_token: Some("UFNF_x-1".into()),
            ..footer
        };
        assert!(with_token.render().contains(r#""resume_token":"UFNF_x-1""#));
        assert!(with_token.render().starts_with(FOOTER_PREFIX));
    }
}
