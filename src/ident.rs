//! SQL identifier handling in pure Rust: splitting a possibly qualified
//! relation name the way PostgreSQL's `::regclass` input does, quoting an
//! identifier for use in generated SQL, and telling a query from a name.

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Split `input` into its dot-separated identifiers, as PostgreSQL's
/// `SplitIdentifierString` (used by `::regclass`) does: white space around
/// each part is skipped, unquoted parts are folded to lower case, `""` inside
/// a quoted part is one quote, and every part is truncated to 63 bytes.
/// Returns `None` when `input` is not valid name syntax.
pub fn split_qualified_name(input: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut rest = input.trim_start_matches(is_sql_space);
    loop {
        let part;
        if let Some(after_quote) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = after_quote.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if after_quote[i + 1..].starts_with('"') {
                        value.push('"');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            let end = end?;
            if value.is_empty() {
                return None;
            }
            part = value;
            rest = &after_quote[end..];
        } else {
            let len = rest
                .find(|c: char| c == '.' || is_sql_space(c))
                .unwrap_or(rest.len());
            if len == 0 {
                return None;
            }
            part = rest[..len].to_ascii_lowercase();
            rest = &rest[len..];
        }
        parts.push(truncate_identifier(part));
        rest = rest.trim_start_matches(is_sql_space);
        if rest.is_empty() {
            return Some(parts);
        }
        rest = rest.strip_prefix('.')?.trim_start_matches(is_sql_space);
    }
}

fn truncate_identifier(mut ident: String) -> String {
    if ident.len() > MAX_IDENTIFIER_BYTES {
        let mut cut = MAX_IDENTIFIER_BYTES;
        while !ident.is_char_boundary(cut) {
            cut -= 1;
        }
        ident.truncate(cut);
    }
    ident
}

/// The characters PostgreSQL's scanner treats as white space.
fn is_sql_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Quote `ident` as a SQL identifier. Always quoting is correct for every
/// name (keywords, upper case, spaces, quotes) and keeps the rule simple.
pub fn quote_identifier(ident: &str) -> String {
    let mut quoted = String::with_capacity(ident.len() + 2);
    quoted.push('"');
    for c in ident.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// True when `source` starts, after white space and opening parentheses,
/// with one of the keywords that begin a query: SELECT, WITH, VALUES, TABLE.
pub fn looks_like_query(source: &str) -> bool {
    let body = source.trim_start_matches(|c: char| is_sql_space(c) || c == '(');
    ["select", "with", "values", "table"].iter().any(|keyword| {
        body.len() >= keyword.len()
            && body.is_char_boundary(keyword.len())
            && body[..keyword.len()].eq_ignore_ascii_case(keyword)
            && !body[keyword.len()..]
                .starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn split(s: &str) -> Option<Vec<String>> {
        split_qualified_name(s)
    }

    #[test]
    fn splits_plain_and_qualified_names() {
        assert_eq!(split("events"), Some(vec!["events".into()]));
        assert_eq!(
            split("  Public . Events "),
            Some(vec!["public".into(), "events".into()])
        );
        assert_eq!(
            split("a.b.c"),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
    }

    #[test]
    fn keeps_quoted_names_verbatim() {
        assert_eq!(split("\"My Table\""), Some(vec!["My Table".into()]));
        assert_eq!(split("s.\"a\"\"b\""), Some(vec!["s".into(), "a\"b".into()]));
        assert_eq!(split("\"a.b\""), Some(vec!["a.b".into()]));
    }

    #[test]
    fn rejects_invalid_syntax() {
        for bad in [
            "",
            " ",
            "select * from t",
            "a..b",
            "a.",
            ".a",
            "\"unterminated",
            "\"\"",
            "a b",
        ] {
            assert_eq!(split(bad), None, "{bad:?} should not parse");
        }
    }

    #[test]
    fn truncates_long_names_on_a_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let parts = split(&format!("\"{long}\"")).unwrap();
        assert_eq!(parts[0].len(), 62);
        assert_eq!(split(&"x".repeat(70)).unwrap()[0].len(), 63);
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("events"), "\"events\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn recognises_queries() {
        for q in [
            "SELECT 1",
            "  (( select 1))",
            "WITH x AS (SELECT 1) TABLE x",
            "values (1)",
            "TABLE events",
            "select\n1",
            "select",
        ] {
            assert!(looks_like_query(q), "{q:?}");
        }
        for q in [
            "events",
            "selection",
            "public.events",
            "withdrawals",
            "tablex",
            "DELETE FROM t",
            "",
        ] {
            assert!(!looks_like_query(q), "{q:?}");
        }
    }
}
