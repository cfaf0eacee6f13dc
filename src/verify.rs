//! Checking an export file against its footer: rows, bytes and CRC-32 of
//! the record lines. Pure Rust over any reader; a gzip file (several
//! members or one) is detected by its magic bytes. Bad contents never
//! raise: they come back as `ok = false` with a detail that names the
//! problem.

use std::io::{self, BufRead, BufReader, Read};

use crate::footer::{FOOTER_PREFIX, FOOTER_VERSION};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub rows: u64,
    pub bytes: u64,
    pub crc32: u32,
    pub detail: String,
}

struct Expected {
    rows: u64,
    bytes: u64,
    crc32: u32,
}

fn parse_footer(line: &[u8]) -> Result<Expected, String> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| format!("the footer line is not valid JSON: {e}"))?;
    let meta = value
        .get("_stream_export")
        .ok_or("the footer line has no _stream_export object")?;
    let version = meta.get("version").and_then(|v| v.as_u64());
    if version != Some(FOOTER_VERSION as u64) {
        return Err(format!(
            "unsupported footer version {}",
            meta.get("version").unwrap_or(&serde_json::Value::Null)
        ));
    }
    let rows = meta
        .get("rows")
        .and_then(|v| v.as_u64())
        .ok_or("the footer has no valid rows")?;
    let bytes = meta
        .get("bytes")
        .and_then(|v| v.as_u64())
        .ok_or("the footer has no valid bytes")?;
    let crc32 = meta
        .get("crc32")
        .and_then(|v| v.as_str())
        .filter(|s| s.len() == 8)
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("the footer has no valid crc32")?;
    if meta.get("complete").and_then(|v| v.as_bool()) != Some(true) {
        return Err("the footer does not say the export is complete".into());
    }
    Ok(Expected { rows, bytes, crc32 })
}

/// Verify an export read from `input` (plain or gzip).
pub fn verify(input: impl Read) -> io::Result<Verdict> {
    let mut buffered = BufReader::with_capacity(1 << 20, input);
    let is_gzip = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if is_gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    Ok(verify_lines(BufReader::with_capacity(1 << 20, reader)))
}

fn verify_lines(mut reader: impl BufRead) -> Verdict {
    let mut rows = 0u64;
    let mut bytes = 0u64;
    let mut crc = libdeflater::Crc::new();
    // The line read last is held back until we know it is not the footer.
    let mut held: Option<Vec<u8>> = None;
    let mut footer_seen_at: Option<u64> = None;
    let mut line = Vec::new();
    let result = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
        if let Some(previous) = held.take() {
            if previous.starts_with(FOOTER_PREFIX.as_bytes()) && footer_seen_at.is_none() {
                footer_seen_at = Some(rows + 1);
            }
            rows += 1;
            bytes += previous.len() as u64;
            crc.update(&previous);
        }
        held = Some(std::mem::take(&mut line));
    };
    let verdict = |ok: bool, detail: String| Verdict {
        ok,
        rows,
        bytes,
        crc32: crc.sum(),
        detail,
    };
    if let Err(e) = result {
        let what = if e.kind() == io::ErrorKind::UnexpectedEof {
            "the gzip stream is truncated"
        } else {
            "the file cannot be read"
        };
        return verdict(false, format!("{what}: {e}"));
    }
    let Some(last) = held else {
        return verdict(false, "the file is empty: no footer".into());
    };
    if !last.ends_with(b"\n") {
        return verdict(
            false,
            "the last line has no newline: the file was cut off".into(),
        );
    }
    if !last.starts_with(FOOTER_PREFIX.as_bytes()) {
        let detail = match footer_seen_at {
            Some(n) => {
                format!("data follows the footer (footer at line {n}): something was appended")
            }
            None => {
                "no footer: the file was cut off, or written without footer => true".to_string()
            }
        };
        // The last line is a record, not a footer: count it.
        rows += 1;
        bytes += last.len() as u64;
        crc.update(&last);
        return Verdict {
            ok: false,
            rows,
            bytes,
            crc32: crc.sum(),
            detail,
        };
    }
    let expected = match parse_footer(&last[..last.len() - 1]) {
        Ok(expected) => expected,
        Err(problem) => return verdict(false, problem),
    };
    let crc32 = crc.sum();
    let mut problems = Vec::new();
    if rows != expected.rows {
        problems.push(format!("{rows} rows, the footer says {}", expected.rows));
    }
    if bytes != expected.bytes {
        problems.push(format!("{bytes} bytes, the footer says {}", expected.bytes));
    }
    if crc32 != expected.crc32 {
        problems.push(format!(
            "CRC-32 {crc32:08x}, the footer says {:08x}",
            expected.crc32
        ));
    }
    if problems.is_empty() {
        verdict(
            true,
            format!("{rows} rows, {bytes} bytes, CRC-32 {crc32:08x}: matches the footer"),
        )
    } else {
        verdict(
            false,
            format!(
                "the contents do not match the footer: {}",
                problems.join("; ")
            ),
        )
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::footer::Footer;
    use crate::options::Compression;
    use crate::sink::{ExportWriter, RecordStats};

    fn export(rows: usize, compression: Compression, footer: bool) -> Vec<u8> {
        let mut writer = ExportWriter::new(Vec::new(), compression, 6);
        for i in 0..rows {
            writer
                .write_record(format!("{{\"id\":{i},\"v\":\"é {i}\"}}").as_bytes())
                .unwrap();
        }
        let make = |s: &RecordStats| Footer {
            rows: s.rows,
            bytes: s.bytes,
            crc32: s.crc32(),
            resume_token: None,
        };
        writer
            .finish(if footer { Some(&make) } else { None })
            .unwrap();
        std::mem::take(writer.output())
    }

    fn check(bytes: &[u8]) -> Verdict {
        verify(bytes).unwrap()
    }

    #[test]
    fn good_files_verify() {
        for compression in [Compression::None, Compression::Gzip] {
            for rows in [0, 1, 50_000] {
                let verdict = check(&export(rows, compression, true));
                assert!(verdict.ok, "{compression} {rows}: {}", verdict.detail);
                assert_eq!(verdict.rows, rows as u64);
            }
        }
    }

    #[test]
    fn damaged_plain_files_are_reported() {
        let good = export(1000, Compression::None, true);
        let mut flipped = good.clone();
        flipped[500] ^= 0x01;
        assert!(check(&flipped).detail.contains("CRC-32"));
        let text = String::from_utf8(good.clone()).unwrap();
        let without_footer = &text[..text.trim_end().rfind('\n').unwrap() + 1];
        assert!(check(without_footer.as_bytes())
            .detail
            .contains("no footer"));
        let cut = &good[..good.len() - 30];
        assert!(check(cut).detail.contains("cut off"));
        let last_record_gone = {
            let lines: Vec<&str> = text.lines().collect();
            let mut kept = lines[..lines.len() - 2].join("\n");
            kept.push('\n');
            kept.push_str(lines[lines.len() - 1]);
            kept.push('\n');
            kept
        };
        let verdict = check(last_record_gone.as_bytes());
        assert!(
            !verdict.ok && verdict.detail.contains("999 rows"),
            "{}",
            verdict.detail
        );
        let mut appended = good.clone();
        appended.extend_from_slice(b"garbage\n");
        assert!(check(&appended).detail.contains("appended"));
        assert!(!check(b"").ok);
        assert!(!check(&export(10, Compression::None, false)).ok);
    }

    #[test]
    fn damaged_gzip_files_are_reported() {
        let good = export(20_000, Compression::Gzip, true);
        let mut corrupt = good.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        let verdict = check(&corrupt);
        assert!(!verdict.ok, "{}", verdict.detail);
        let truncated = &good[..good.len() - 100];
        let verdict = check(truncated);
        assert!(!verdict.ok, "{}", verdict.detail);
        let mut garbage = good.clone();
        garbage.extend_from_slice(b"not gzip at all");
        assert!(!check(&garbage).ok);
    }
}
