//! JSON string escaping, exactly as PostgreSQL's `escape_json` does it:
//! `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, every other byte below 0x20 as
//! `\u00XX` (lower-case hex), and everything else, including DEL and all
//! multi-byte UTF-8, copied unchanged.

/// For each byte: 0 = copy as is, otherwise the escape class.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// True when some byte of `word` needs escaping (a control character, `"`
/// or `\`). Exact for the existence question, which is all it is used for.
#[inline(always)]
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = (word ^ (ONES * b'"' as u64)).wrapping_sub(ONES) & !(word ^ (ONES * b'"' as u64));
    let backslash =
        (word ^ (ONES * b'\\' as u64)).wrapping_sub(ONES) & !(word ^ (ONES * b'\\' as u64));
    (below_space | quote | backslash) & HIGHS != 0
}

/// Append `bytes` to `out` as a quoted JSON string.
pub fn escape_json_into(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    escape_json_body(out, bytes);
    out.push(b'"');
}

/// Append the escaped form of `bytes` without the surrounding quotes.
pub fn escape_json_body(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0; // first byte not yet copied
    let mut i = 0;
    while i < bytes.len() {
        // Skip eight clean bytes at a time.
        if i + 8 <= bytes.len() {
            let mut chunk = [0u8; 8];
            chunk.copy_from_slice(&bytes[i..i + 8]);
            if !word_needs_escape(u64::from_le_bytes(chunk)) {
                i += 8;
                continue;
            }
        }
        let class = ESCAPE[bytes[i] as usize];
        if class == 0 {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match class {
            b'u' => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(bytes[i] >> 4) as usize],
                HEX[(bytes[i] & 0xf) as usize],
            ]),
            other => out.extend_from_slice(&[b'\\', other]),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Standard base64 with padding and no line breaks (bytea_base64).
pub fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    use base64::Engine;
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn base64_is_standard_with_padding() {
        use base64::Engine;
        for input in [
            &b""[..],
            b"\x00",
            b"\x00\xff",
            b"\x00\xff\x10",
            &[7u8; 1000][..],
        ] {
            let mut out = b"x".to_vec();
            push_base64(&mut out, input);
            let want = base64::engine::general_purpose::STANDARD.encode(input);
            assert_eq!(&out[1..], want.as_bytes());
        }
        let mut out = Vec::new();
        push_base64(&mut out, &[0x00, 0xff, 0x10]);
        assert_eq!(out, b"AP8Q");
    }

    fn escaped(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        escape_json_into(&mut out, bytes);
        String::from_utf8(out).unwrap()
    }

    /// The reference: a byte-at-a-time transcription of escape_json.
    fn reference(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in bytes {
            match b {
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b if b < 0x20 => out.extend_from_slice(format!("\\u{:04x}", b).as_bytes()),
                b => out.push(b),
            }
        }
        out.push(b'"');
        out
    }

    #[test]
    fn every_ascii_byte_alone() {
        let expected: [&str; 32] = [
            "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007",
            "\\b", "\\t", "\\n", "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010",
            "\\u0011", "\\u0012", "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017", "\\u0018",
            "\\u0019", "\\u001a", "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
        ];
        for b in 0u8..=0x7f {
            let want = match b {
                0..=0x1f => expected[b as usize].to_string(),
                b'"' => "\\\"".to_string(),
                b'\\' => "\\\\".to_string(),
                _ => (b as char).to_string(),
            };
            assert_eq!(escaped(&[b]), format!("\"{want}\""), "byte {b:#04x}");
        }
    }

    #[test]
    fn every_byte_at_every_position_of_a_word() {
        // Exercise the eight-byte fast path with the special byte anywhere.
        for b in 0u8..=0xff {
            for pos in 0..17 {
                let mut input = vec![b'a'; 17];
                input[pos] = b;
                let mut out = Vec::new();
                escape_json_into(&mut out, &input);
                assert_eq!(out, reference(&input), "byte {b:#04x} at {pos}");
            }
        }
    }

    #[test]
    fn multibyte_utf8_and_del_pass_through() {
        let s = "café 漢字 🎉🇫🇷 \u{7f} end";
        assert_eq!(escaped(s.as_bytes()), format!("\"{s}\""));
    }

    #[test]
    fn mixed_long_input_matches_reference() {
        let mut input = Vec::new();
        for i in 0..5000u32 {
            input.extend_from_slice(b"plain ascii run ");
            input.push((i % 128) as u8);
            input.extend_from_slice("é漢🎉".as_bytes());
        }
        let mut out = Vec::new();
        escape_json_into(&mut out, &input);
        assert_eq!(out, reference(&input));
    }

    #[test]
    fn empty_string() {
        assert_eq!(escaped(b""), "\"\"");
    }
}
