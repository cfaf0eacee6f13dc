//! Checking an export file against its footer: rows, bytes and CRC-32 of
//! the record lines. Pure Rust over any reader; a gzip file (several
//! members or one) and a zstd file (a sequence of frames) are detected by
//! their magic bytes. Bad contents never
//! raise: they come back as `ok = false` with a detail that names the
//! problem.

use std::io::{self, BufRead, BufReader, Read};

use crate::footer::{FOOTER_PREFIX, FOOTER_VERSION};
use crate::layout::{is_node_export_directory, is_part_file_name, node_id_problem, MANIFEST};
use crate::options::Compression;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub rows: u64,
    pub bytes: u64,
    pub crc32: u32,
    pub detail: String,
    /// The footer's resume token, when the file matches a footer that has
    /// one (an export with a key).
    pub resume_token: Option<String>,
}

struct Expected {
    rows: u64,
    bytes: u64,
    crc32: u32,
    resume_token: Option<String>,
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
    let resume_token = meta
        .get("resume_token")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok(Expected {
        rows,
        bytes,
        crc32,
        resume_token,
    })
}

/// The longest footer line that is read as a footer (its resume token
/// carries the last key, so it grows with the key). A longer last line is
/// not a footer: the check ends with `ok = false`. Record lines of any
/// length are checked in constant memory.
pub const FOOTER_MAX_BYTES: usize = 16 << 20;

/// Bytes read at a time; `interrupt` is called once per chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// The magic bytes that start a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Verify an export read from `input` (plain, gzip or zstd), in constant
/// memory.
/// `interrupt` is called between chunks (a cancel or timeout check that
/// may raise).
pub fn verify(input: impl Read, interrupt: &mut dyn FnMut()) -> io::Result<Verdict> {
    let (codec, mut reader) = decoded(input)?;
    let mut scanner = Scanner::default();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        interrupt();
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // A read stopped for a cancel is the cancel, not a verdict.
                interrupt();
                let what = match codec {
                    Compression::None => "the file cannot be read".to_owned(),
                    _ if e.kind() == io::ErrorKind::UnexpectedEof => {
                        format!("the {codec} stream is truncated")
                    }
                    _ => format!("the {codec} stream is corrupt"),
                };
                return Ok(scanner.verdict(false, format!("{what}: {e}")));
            }
        };
        scanner.feed(&chunk[..n]);
    }
    Ok(scanner.finish())
}

/// The uncompressed bytes of an export read from `input`, whose codec
/// (plain, gzip or zstd) is detected from its first bytes.
pub fn decoded<'a>(input: impl Read + 'a) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut buffered = BufReader::with_capacity(CHUNK_BYTES, input);
    let head = buffered.fill_buf()?;
    let codec = if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::None
    };
    let reader: Box<dyn Read + 'a> = match codec {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        Compression::None => Box::new(buffered),
    };
    Ok((codec, reader))
}

/// The line being read: too short yet to tell, a record, or a line that
/// starts like the footer (held, up to [`FOOTER_MAX_BYTES`]).
enum Line {
    Head(Vec<u8>),
    Record,
    Candidate(Vec<u8>),
}

impl Default for Line {
    fn default() -> Self {
        Line::Head(Vec::new())
    }
}

/// Counts record lines, their bytes and CRC-32 as bytes stream by; holds
/// back only a complete line that may be the footer until the next line
/// shows it was not the last.
#[derive(Default)]
struct Scanner {
    rows: u64,
    bytes: u64,
    crc: crc32fast::Hasher,
    line: Line,
    line_len: u64,
    held: Option<Vec<u8>>,
    /// Line number of the first footer-like line followed by more lines.
    footer_seen_at: Option<u64>,
    /// The current line started like the footer but outgrew the limit.
    oversized: bool,
    last_oversized: bool,
    any_line: bool,
    /// The first line is `[`: a JSON array export (see `sink::array`).
    array: bool,
    /// An array's closing `]` line was read; nothing may follow.
    closed: bool,
    after_close: bool,
}

impl Scanner {
    fn record_bytes(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        self.crc.update(bytes);
    }

    /// A footer-like line held back turned out not to be the last one: it
    /// was a record.
    fn release_held(&mut self) {
        if let Some(held) = self.held.take() {
            self.footer_seen_at.get_or_insert(self.rows + 1);
            self.record_bytes(&held);
            self.rows += 1;
        }
    }

    /// Whether a line that starts with `head` is footer-like; None while
    /// too little of it is known. In an array the footer element comes
    /// after its separator.
    fn footer_like(&self, head: &[u8], ends_line: bool) -> Option<bool> {
        let prefix = FOOTER_PREFIX.as_bytes();
        let skip = usize::from(self.array);
        if head.len() < prefix.len() + skip && !ends_line {
            return None;
        }
        let separated = !self.array || matches!(head.first(), Some(b' ' | b','));
        Some(separated && head.len() >= skip && head[skip..].starts_with(prefix))
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.closed {
                self.after_close = true;
                return;
            }
            if self.line_len == 0 {
                self.oversized = false;
            }
            let (segment, ends_line) = match memchr::memchr(b'\n', data) {
                Some(at) => (&data[..=at], true),
                None => (data, false),
            };
            data = &data[segment.len()..];
            self.line_len += segment.len() as u64;
            let line = std::mem::take(&mut self.line);
            self.line = match line {
                Line::Head(mut head) => {
                    head.extend_from_slice(segment);
                    let first_line = !self.any_line && self.rows == 0;
                    if first_line && ends_line && head == crate::sink::array::OPEN {
                        // The opening bracket: covered by the checksum, not a row.
                        self.array = true;
                        self.record_bytes(&head);
                        self.any_line = true;
                        self.line_len = 0;
                        continue;
                    }
                    if self.array && ends_line && head == crate::sink::array::CLOSE {
                        // The closing bracket ends the array after the footer.
                        self.closed = true;
                        self.any_line = true;
                        self.line_len = 0;
                        continue;
                    }
                    match self.footer_like(&head, ends_line) {
                        None => Line::Head(head),
                        Some(footer_like) => {
                            self.release_held();
                            if footer_like {
                                Line::Candidate(head)
                            } else {
                                self.record_bytes(&head);
                                Line::Record
                            }
                        }
                    }
                }
                Line::Record => {
                    self.record_bytes(segment);
                    Line::Record
                }
                Line::Candidate(mut held) => {
                    held.extend_from_slice(segment);
                    Line::Candidate(held)
                }
            };
            if matches!(&self.line, Line::Candidate(held) if held.len() > FOOTER_MAX_BYTES) {
                if let Line::Candidate(held) = std::mem::replace(&mut self.line, Line::Record) {
                    self.record_bytes(&held);
                }
                self.oversized = true;
            }
            if ends_line {
                self.any_line = true;
                self.last_oversized = self.oversized;
                match std::mem::take(&mut self.line) {
                    Line::Candidate(held) => self.held = Some(held),
                    Line::Head(head) => {
                        self.release_held();
                        self.record_bytes(&head);
                        self.rows += 1;
                    }
                    Line::Record => self.rows += 1,
                }
                self.line_len = 0;
            }
        }
    }

    fn verdict(&self, ok: bool, detail: String) -> Verdict {
        Verdict {
            ok,
            rows: self.rows,
            bytes: self.bytes,
            crc32: self.crc.clone().finalize(),
            detail,
            resume_token: None,
        }
    }

    fn finish(mut self) -> Verdict {
        if self.line_len > 0 {
            return self.verdict(
                false,
                "the last line has no newline: the file was cut off".into(),
            );
        }
        if self.after_close {
            return self.verdict(
                false,
                "data follows the array's closing bracket: something was appended".into(),
            );
        }
        if self.array && !self.closed {
            self.release_held();
            return self.verdict(
                false,
                "the array has no closing bracket: the file was cut off".into(),
            );
        }
        let Some(last) = self.held.take() else {
            if !self.any_line {
                return self.verdict(false, "the file is empty: no footer".into());
            }
            let detail = if self.last_oversized {
                format!(
                    "no footer: the last line starts like a footer but is longer than {} MiB",
                    FOOTER_MAX_BYTES >> 20
                )
            } else {
                match self.footer_seen_at {
                    Some(n) => format!(
                        "data follows the footer (footer at line {n}): something was appended"
                    ),
                    None => "no footer: the file was cut off, or written without footer => true"
                        .to_string(),
                }
            };
            return self.verdict(false, detail);
        };
        // Without its newline, and in an array without its separator.
        let footer = &last[usize::from(self.array)..last.len() - 1];
        let expected = match parse_footer(footer) {
            Ok(expected) => expected,
            Err(problem) => return self.verdict(false, problem),
        };
        let (rows, bytes, crc32) = (self.rows, self.bytes, self.crc.clone().finalize());
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
            Verdict {
                resume_token: expected.resume_token,
                ..self.verdict(
                    true,
                    format!("{rows} rows, {bytes} bytes, CRC-32 {crc32:08x}: matches the footer"),
                )
            }
        } else {
            self.verdict(
                false,
                format!(
                    "the contents do not match the footer: {}",
                    problems.join("; ")
                ),
            )
        }
    }
}

/// A reader of the file (or object) `name` of a directory export.
pub type OpenListed<'a> = dyn FnMut(&str) -> std::io::Result<Box<dyn std::io::Read>> + 'a;

/// The largest manifest (or manifest of manifests) that is read: what
/// verifying holds in memory stays bounded whatever is under a prefix.
/// About 200,000 parts.
pub const MANIFEST_LIMIT: u64 = 32 << 20;

/// What verifying reads of a manifest: only these fields, typed, so that
/// memory follows the size of the manifest and not that of a JSON tree.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Manifest {
    consistency: Option<String>,
    parts: Option<Vec<ListedPart>>,
    nodes: Option<Vec<ListedNode>>,
    totals: ListedTotals,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ListedPart {
    node: Option<String>,
    file: Option<String>,
    rows: Option<u64>,
    crc32: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ListedNode {
    node: Option<String>,
    directory: Option<String>,
    rows: Option<i64>,
    manifest_bytes: Option<u64>,
    manifest_crc32: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ListedTotals {
    rows: Option<i64>,
}

/// A manifest larger than [`MANIFEST_LIMIT`]: a limit of the reader, not
/// a verdict on the export.
#[derive(Debug)]
pub struct ManifestTooLarge(pub String);

impl std::fmt::Display for ManifestTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is larger than {} MiB, the most a manifest is read",
            self.0,
            MANIFEST_LIMIT >> 20
        )
    }
}

impl std::error::Error for ManifestTooLarge {}

/// The bytes of a manifest; a [`ManifestTooLarge`] error when it is larger
/// than [`MANIFEST_LIMIT`].
fn read_limited(file: impl Read, what: &str) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MANIFEST_LIMIT + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MANIFEST_LIMIT {
        return Err(io::Error::other(ManifestTooLarge(what.to_owned())));
    }
    Ok(bytes)
}

/// Check every part of a directory export against the manifest and its own
/// footer, reading each file with `open`. Returns (ok, parts, rows,
/// detail); never raises for bad contents. A top-level manifest larger
/// than [`MANIFEST_LIMIT`] goes to `too_large` (which raises `54000` in
/// the server) before it is a verdict.
pub fn verify_directory(
    open: &mut OpenListed<'_>,
    interrupt: &mut dyn FnMut(),
    too_large: &mut dyn FnMut(&ManifestTooLarge),
) -> (bool, i32, i64, String) {
    let bytes = match open(MANIFEST).and_then(|file| read_limited(file, MANIFEST)) {
        Ok(bytes) => bytes,
        Err(e) => {
            if let Some(large) = e
                .get_ref()
                .and_then(|e| e.downcast_ref::<ManifestTooLarge>())
            {
                too_large(large);
            }
            return (false, 0, 0, format!("cannot read manifest.json: {e}"));
        }
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
        return (false, 0, 0, "manifest.json is not a valid manifest".into());
    };
    drop(bytes);
    if manifest.consistency.as_deref() == Some("per_node") {
        return verify_nodes(open, &manifest, interrupt);
    }
    verify_listed_parts(open, &manifest, interrupt)
}

/// Check the parts a directory or chunked export's manifest lists, each
/// listed once.
fn verify_listed_parts(
    open: &mut OpenListed<'_>,
    manifest: &Manifest,
    interrupt: &mut dyn FnMut(),
) -> (bool, i32, i64, String) {
    let Some(parts) = manifest.parts.as_ref() else {
        return (false, 0, 0, "manifest.json has no parts".into());
    };
    let count = parts.len() as i32;
    let mut rows = 0i64;
    let mut seen = std::collections::HashSet::with_capacity(parts.len());
    for part in parts {
        let name = part.file.as_deref().unwrap_or("");
        if !seen.insert(name) {
            return (
                false,
                count,
                rows,
                format!("{name} is listed more than once"),
            );
        }
        if !is_part_file_name(name) {
            return (
                false,
                count,
                rows,
                format!("\"{name}\" is not a part file name"),
            );
        }
        let verdict = match open(name).and_then(|file| verify(file, interrupt)) {
            Ok(verdict) => verdict,
            Err(e) => return (false, count, rows, format!("{name}: cannot be read: {e}")),
        };
        if !verdict.ok {
            return (false, count, rows, format!("{name}: {}", verdict.detail));
        }
        let expected = (part.rows, part.crc32.as_deref());
        if expected
            != (
                Some(verdict.rows),
                Some(format!("{:08x}", verdict.crc32).as_str()),
            )
        {
            return (
                false,
                count,
                rows,
                format!("{name}: does not match the manifest"),
            );
        }
        rows += verdict.rows as i64;
    }
    if manifest.totals.rows != Some(rows) {
        return (
            false,
            count,
            rows,
            "the parts' rows do not add up to the manifest's total".into(),
        );
    }
    (
        true,
        count,
        rows,
        format!("{count} parts, {rows} rows: all match the manifest"),
    )
}

/// Check a cluster export's manifest of manifests: each node's manifest
/// must have the size and CRC-32 recorded for it, its parts must verify
/// ([`verify_listed_parts`]) and add up to the node's rows, the flat part
/// list must be the nodes' parts, and the nodes must add up to the totals.
fn verify_nodes(
    open: &mut OpenListed<'_>,
    manifest: &Manifest,
    interrupt: &mut dyn FnMut(),
) -> (bool, i32, i64, String) {
    let Some(nodes) = manifest.nodes.as_ref() else {
        return (false, 0, 0, "manifest.json lists no nodes".into());
    };
    let listed: &[ListedPart] = manifest.parts.as_deref().unwrap_or_default();
    let (mut count, mut rows, mut flat) = (0i32, 0i64, 0usize);
    let mut seen = std::collections::HashSet::with_capacity(nodes.len());
    for node in nodes {
        let id = node.node.as_deref().unwrap_or("");
        let fail = |count, rows, what: String| (false, count, rows, format!("node {id}: {what}"));
        if !seen.insert(id) {
            return fail(count, rows, "listed more than once".into());
        }
        let directory = node.directory.clone().unwrap_or_default();
        if node_id_problem(id).is_some() || !is_node_export_directory(id, &directory) {
            return fail(count, rows, "not a node directory".into());
        }
        let mut node_open = |name: &str| open(&format!("{directory}{name}"));
        let what = format!("{directory}{MANIFEST}");
        let bytes = match node_open(MANIFEST).and_then(|f| read_limited(f, &what)) {
            Ok(bytes) => bytes,
            Err(e) => return fail(count, rows, format!("cannot read manifest.json: {e}")),
        };
        let recorded = (node.manifest_bytes, node.manifest_crc32.as_deref());
        let crc = format!("{:08x}", crc32fast::hash(&bytes));
        if recorded != (Some(bytes.len() as u64), Some(crc.as_str())) {
            return fail(
                count,
                rows,
                "manifest.json is not the one the cluster export recorded".into(),
            );
        }
        let Ok(node_manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
            return fail(count, rows, "manifest.json is not a valid manifest".into());
        };
        drop(bytes);
        if node_manifest.consistency.as_deref() == Some("per_node") {
            return fail(count, rows, "manifest.json is not a node's export".into());
        }
        let (ok, parts, node_rows, detail) =
            verify_listed_parts(&mut node_open, &node_manifest, interrupt);
        if !ok {
            return fail(count + parts, rows + node_rows, detail);
        }
        if node.rows != Some(node_rows) {
            return fail(
                count,
                rows,
                "its rows do not match the manifest of manifests".into(),
            );
        }
        for part in node_manifest.parts.iter().flatten() {
            let path = format!("{directory}{}", part.file.as_deref().unwrap_or(""));
            let same = listed.get(flat).is_some_and(|entry| {
                entry.node.as_deref() == Some(id)
                    && entry.file.as_deref() == Some(path.as_str())
                    && entry.rows == part.rows
                    && entry.crc32 == part.crc32
            });
            if !same {
                return fail(
                    count,
                    rows,
                    format!("{path} is not listed as its manifest says"),
                );
            }
            flat += 1;
        }
        count += parts;
        rows += node_rows;
    }
    if flat != listed.len() {
        return (
            false,
            count,
            rows,
            "manifest.json lists parts no node has".into(),
        );
    }
    if manifest.totals.rows != Some(rows) {
        return (
            false,
            count,
            rows,
            "the nodes' rows do not add up to the manifest's total".into(),
        );
    }
    (
        true,
        count,
        rows,
        format!(
            "{} nodes, {count} parts, {rows} rows: all match the manifests",
            nodes.len()
        ),
    )
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::sink::{ExportWriter, RecordStats};

    fn export(rows: usize, compression: Compression, footer: bool) -> Vec<u8> {
        export_shaped(rows, compression, footer, false)
    }

    fn export_shaped(rows: usize, compression: Compression, footer: bool, array: bool) -> Vec<u8> {
        let mut writer = ExportWriter::new(Vec::new(), compression, 6).writing_array(array);
        for i in 0..rows {
            writer
                .write_record(format!("{{\"id\":{i},\"v\":\"é {i}\"}}").as_bytes())
                .unwrap();
        }
        let make = |s: &RecordStats| s.footer(None);
        writer
            .finish(if footer { Some(&make) } else { None })
            .unwrap();
        std::mem::take(writer.output())
    }

    fn check(bytes: &[u8]) -> Verdict {
        verify(bytes, &mut || {}).unwrap()
    }

    /// A cluster export in memory: nodes a and b, one part each, and the
    /// manifest of manifests over them.
    fn cluster_files() -> std::collections::HashMap<String, Vec<u8>> {
        let mut files = std::collections::HashMap::new();
        let (mut nodes, mut listed) = (Vec::new(), Vec::new());
        for (node, rows) in [("a", 3usize), ("b", 5)] {
            let part = export(rows, Compression::Gzip, true);
            let crc = format!("{:08x}", check(&part).crc32);
            let name = "part-0123456789ab-00000.ndjson.gz";
            let manifest = serde_json::json!({
                "pg_stream_export_manifest": 1, "consistency": "snapshot",
                "totals": {"rows": rows},
                "parts": [{"file": name, "rows": rows, "crc32": crc}],
            })
            .to_string()
            .into_bytes();
            nodes.push(serde_json::json!({
                "node": node, "directory": format!("node-{node}/"), "rows": rows,
                "manifest_bytes": manifest.len(),
                "manifest_crc32": format!("{:08x}", crc32fast::hash(&manifest)),
            }));
            listed.push(serde_json::json!({
                "node": node, "file": format!("node-{node}/{name}"), "rows": rows, "crc32": crc,
            }));
            files.insert(format!("node-{node}/{name}"), part);
            files.insert(format!("node-{node}/{MANIFEST}"), manifest);
        }
        let top = serde_json::json!({
            "pg_stream_export_manifest": 1, "consistency": "per_node",
            "totals": {"rows": 8}, "nodes": nodes, "parts": listed,
        });
        files.insert(MANIFEST.to_string(), top.to_string().into_bytes());
        files
    }

    fn verify_files(
        files: &std::collections::HashMap<String, Vec<u8>>,
    ) -> (bool, i32, i64, String) {
        verify_directory(
            &mut |name| match files.get(name) {
                Some(bytes) => Ok(Box::new(io::Cursor::new(bytes.clone())) as Box<dyn Read>),
                None => Err(io::Error::from(io::ErrorKind::NotFound)),
            },
            &mut || {},
            &mut |_| {},
        )
    }

    #[test]
    fn a_manifest_of_manifests_verifies_every_node() {
        let files = cluster_files();
        let (ok, parts, rows, detail) = verify_files(&files);
        assert!(ok, "{detail}");
        assert_eq!((parts, rows), (2, 8));

        let mut damaged = files.clone();
        let part = damaged
            .get_mut("node-b/part-0123456789ab-00000.ndjson.gz")
            .unwrap();
        let middle = part.len() / 2;
        part[middle] ^= 1;
        let (ok, _, _, detail) = verify_files(&damaged);
        assert!(!ok && detail.starts_with("node b:"), "{detail}");

        let mut replaced = files.clone();
        replaced.get_mut("node-a/manifest.json").unwrap().push(b' ');
        let (ok, _, _, detail) = verify_files(&replaced);
        assert!(!ok && detail.contains("not the one"), "{detail}");

        let mut missing = files.clone();
        missing.remove("node-b/manifest.json");
        let (ok, _, _, detail) = verify_files(&missing);
        assert!(!ok && detail.starts_with("node b: cannot read"), "{detail}");

        let mut escaping = files;
        let top: serde_json::Value = serde_json::from_slice(&escaping[MANIFEST]).unwrap();
        let mut top = top;
        top["nodes"][0]["directory"] = "../elsewhere/".into();
        escaping.insert(MANIFEST.into(), top.to_string().into_bytes());
        let (ok, _, _, detail) = verify_files(&escaping);
        assert!(!ok && detail.contains("not a node directory"), "{detail}");
    }

    #[test]
    fn good_files_verify() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            for rows in [0, 1, 50_000] {
                let verdict = check(&export(rows, compression, true));
                assert!(verdict.ok, "{compression} {rows}: {}", verdict.detail);
                assert_eq!(verdict.rows, rows as u64);
            }
        }
    }

    #[test]
    fn a_good_file_gives_its_footers_resume_token() {
        let mut writer = ExportWriter::new(Vec::new(), Compression::Gzip, 6);
        writer.write_record(b"{\"id\":1}").unwrap();
        let make = |s: &RecordStats| s.footer(Some("dG9rZW4".into()));
        writer.finish(Some(&make)).unwrap();
        let mut file = std::mem::take(writer.output());
        assert_eq!(check(&file).resume_token.as_deref(), Some("dG9rZW4"));
        assert_eq!(
            check(&export(3, Compression::None, true)).resume_token,
            None
        );
        // A file that does not match its footer gives no token.
        let last = file.len() - 12;
        file[last] ^= 0x40;
        let damaged = check(&file);
        assert!(!damaged.ok);
        assert_eq!(damaged.resume_token, None);
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
    fn array_exports_verify_and_damage_is_reported() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            for rows in [0, 1, 3, 50_000] {
                let good = export_shaped(rows, compression, true, true);
                let verdict = check(&good);
                assert!(verdict.ok, "{compression} {rows}: {}", verdict.detail);
                assert_eq!(verdict.rows, rows as u64);
            }
        }
        let good = export_shaped(3, Compression::None, true, true);
        let text = String::from_utf8(good.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[");
        assert!(lines[1].starts_with(" {\"id\":0"));
        assert!(lines[2].starts_with(",{\"id\":1"));
        assert!(lines[4].starts_with(",{\"_stream_export\":"));
        assert_eq!(lines[5], "]");
        // The bytes before the footer element are what the footer covers.
        let footer_at = text.find(",{\"_stream_export\"").unwrap();
        assert_eq!(check(&good).bytes, footer_at as u64);
        let unclosed = &good[..good.len() - 2];
        assert!(check(unclosed).detail.contains("closing bracket"));
        let mut appended = good.clone();
        appended.extend_from_slice(b",{\"id\":9}\n");
        assert!(check(&appended).detail.contains("appended"));
        let mut flipped = good.clone();
        flipped[10] ^= 0x01;
        assert!(check(&flipped).detail.contains("CRC-32"));
        let without_footer = export_shaped(3, Compression::None, false, true);
        assert!(serde_json::from_slice::<serde_json::Value>(&without_footer).is_ok());
        assert!(check(&without_footer).detail.contains("no footer"));
        // An empty array is valid JSON too.
        assert_eq!(export_shaped(0, Compression::None, false, true), b"[\n]\n");
        // With a footer, the whole file still parses as one JSON array.
        let parsed: serde_json::Value = serde_json::from_slice(&good).unwrap();
        assert_eq!(parsed.as_array().unwrap().len(), 4);
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

    #[test]
    fn damaged_zstd_files_are_reported() {
        let good = export(50_000, Compression::Zstd, true);
        assert!(good.starts_with(&ZSTD_MAGIC));
        let mut corrupt = good.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        let verdict = check(&corrupt);
        assert!(!verdict.ok, "{}", verdict.detail);
        let verdict = check(&good[..good.len() - 100]);
        assert!(
            !verdict.ok && verdict.detail.contains("zstd stream is truncated"),
            "{}",
            verdict.detail
        );
        let mut garbage = good.clone();
        garbage.extend_from_slice(b"not zstd at all");
        let verdict = check(&garbage);
        assert!(!verdict.ok, "{}", verdict.detail);
    }

    #[test]
    fn long_lines_stream_in_constant_memory() {
        // 64 MiB without a newline: cut off, and counted as it streams.
        let verdict = verify(io::repeat(b'x').take(64 << 20), &mut || {}).unwrap();
        assert!(
            !verdict.ok && verdict.detail.contains("cut off"),
            "{}",
            verdict.detail
        );
        // A huge record line is fine when the footer follows.
        let mut writer = ExportWriter::new(Vec::new(), Compression::None, 6);
        writer.write_record(&vec![b'a'; 40 << 20]).unwrap();
        writer
            .write_record(b"{\"_stream_export\": \"a record that looks like a footer\"}")
            .unwrap();
        writer.write_record(b"{\"id\":1}").unwrap();
        let make = |s: &RecordStats| s.footer(None);
        writer.finish(Some(&make)).unwrap();
        let verdict = check(writer.output());
        assert!(verdict.ok, "{}", verdict.detail);
        assert_eq!(verdict.rows, 3);
    }

    #[test]
    fn an_oversized_footer_like_last_line_is_not_a_footer() {
        let mut data = FOOTER_PREFIX.as_bytes().to_vec();
        data.extend(std::iter::repeat_n(b'x', FOOTER_MAX_BYTES + 10));
        data.push(b'\n');
        let verdict = check(&data);
        assert!(
            !verdict.ok && verdict.detail.contains("longer than"),
            "{}",
            verdict.detail
        );
        assert_eq!(verdict.rows, 1);
    }

    #[test]
    fn the_interrupt_check_runs_while_reading() {
        let mut calls = 0;
        let _ = verify(io::repeat(b'x').take(8 << 20), &mut || calls += 1).unwrap();
        assert!(calls >= 8, "{calls}");
    }
}
