//! The layout of an export written as several part files plus a
//! `manifest.json`, shared by the directory export and the chunked export:
//! part names, reading and committing manifests, removing what an export
//! that died left behind, and verifying the whole.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use pgrx::pg_sys;
use serde_json::Value;

use crate::destination::file::{raise_io, remove_if_abandoned, Directory, Occupant, PartialFile};

/// The file that lists the parts; its arrival is an export's commit point.
pub const MANIFEST: &str = "manifest.json";
/// A chunked export's journal: a header line, then one line per finished
/// chunk, appended as each chunk is in place.
pub const PROGRESS: &str = "progress.jsonl";

/// A chunked export's journal header object under an object prefix.
pub const PROGRESS_HEADER: &str = "progress.json";

/// `part-<id>-NNNNN.ndjson[.gz]`.
pub fn part_name(export_id: &str, index: usize, gzip: bool) -> String {
    format!(
        "part-{export_id}-{index:05}.ndjson{}",
        if gzip { ".gz" } else { "" }
    )
}

/// The export id in a part file name of this layout (with `.partial` or
/// not), or `None` for any other name.
pub fn export_id_of_part(name: &[u8]) -> Option<&[u8]> {
    let name = name.strip_suffix(b".partial").unwrap_or(name);
    let name = name
        .strip_suffix(b".ndjson.gz")
        .or_else(|| name.strip_suffix(b".ndjson"))?;
    let rest = name.strip_prefix(b"part-")?;
    let (id, number) = (rest.get(..12)?, rest.get(12..)?);
    let number = number.strip_prefix(b"-")?;
    (id.iter().all(|b| b.is_ascii_hexdigit())
        && number.len() >= 5
        && number.iter().all(u8::is_ascii_digit))
    .then_some(id)
}

/// A part file name that a manifest may list and an overwrite may remove:
/// this layout's, or the earlier `part-NNNNN.ndjson[.gz]`.
pub fn is_part_file_name(name: &str) -> bool {
    if export_id_of_part(name.as_bytes()).is_some() {
        return true;
    }
    let stem = name
        .strip_suffix(".ndjson.gz")
        .or_else(|| name.strip_suffix(".ndjson"));
    stem.and_then(|s| s.strip_prefix("part-"))
        .is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A random id for this export's file names: 12 hex digits.
pub fn new_export_id() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: fills the buffer from PostgreSQL's strong random source.
    if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) } {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&(now as u64 ^ std::process::id() as u64).to_be_bytes()[2..]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The part file names a manifest lists (only valid part names).
pub fn manifest_parts(manifest: &Value) -> Vec<String> {
    manifest["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["file"].as_str())
                .filter(|name| is_part_file_name(name))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub fn read_manifest(file: impl std::io::Read) -> Option<Value> {
    use std::io::Read;
    let mut text = Vec::new();
    file.take(64 << 20).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The manifest (or progress record) `name` in `directory`, when there is
/// one that parses.
pub fn read_listing(directory: &Directory, name: &str) -> Option<Value> {
    directory
        .open_regular(OsStr::new(name))
        .ok()
        .and_then(read_manifest)
}

/// Read a chunked export's journal: its header, and each intact chunk
/// line handed to `on_entry` in order, without keeping them. A last line
/// cut short by a crash while it was appended is not an entry; the
/// returned length is where the intact lines end. `None` without a
/// journal (or one whose header does not parse).
pub fn read_journal(
    directory: &Directory,
    mut on_entry: impl FnMut(&Value),
) -> Option<(Value, u64)> {
    use std::io::BufRead;
    let file = directory.open_regular(OsStr::new(PROGRESS)).ok()?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut header = None;
    let mut good_len = 0u64;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if line.last() != Some(&b'\n') {
                    break;
                }
                let Ok(value) = serde_json::from_slice::<Value>(&line) else {
                    break;
                };
                match header {
                    None => header = Some(value),
                    Some(_) => on_entry(&value),
                }
                good_len += n as u64;
            }
        }
    }
    header.map(|h| (h, good_len))
}

/// With the directory's manifest lock held, no other export is running
/// here: part files that neither the manifest nor an unfinished chunked
/// export's progress record lists, and partial parts without a lock, were
/// left by exports that died. Remove them.
pub fn remove_stale_parts(directory: &Directory) {
    let mut current: Vec<String> = read_listing(directory, MANIFEST)
        .map(|manifest| manifest_parts(&manifest))
        .unwrap_or_default();
    read_journal(directory, |entry| {
        if let Some(name) = entry["file"].as_str().filter(|n| is_part_file_name(n)) {
            current.push(name.to_owned());
        }
    });
    let Ok(names) = directory.names() else {
        return;
    };
    for name in names {
        if export_id_of_part(name.as_bytes()).is_none()
            || current.iter().any(|c| c.as_bytes() == name.as_bytes())
        {
            continue;
        }
        if let Ok(Occupant::Removed(size)) = remove_if_abandoned(directory, &name) {
            pgrx::log!(
                "pg_stream_export: removed \"{}\" ({size} bytes) left by an export that did not finish",
                directory.display(&name)
            );
        }
    }
}

/// Write `listing` into `partial` and rename it into place (for the
/// manifest: the commit point). With `overwrite`, the parts of the
/// manifest it replaced that the new one does not list are removed.
pub fn commit_listing(
    directory: &Directory,
    mut partial: PartialFile,
    name: &str,
    listing: &Value,
    overwrite: bool,
) {
    let text = serde_json::to_string_pretty(listing).unwrap_or_default() + "\n";
    let mut file = partial.take_file().unwrap_or_else(|e| raise_io(e, name));
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap_or_else(|e| raise_io(e, name));
    let new_parts = manifest_parts(listing);
    commit_manifest(directory, partial, file, overwrite, |part| {
        new_parts.iter().any(|p| p == part)
    });
}

/// Rename a written manifest into place: the commit point. With
/// `overwrite`, the parts of the manifest it replaced are removed, except
/// those `still_listed` says the new one lists.
pub fn commit_manifest(
    directory: &Directory,
    partial: PartialFile,
    file: std::fs::File,
    overwrite: bool,
    still_listed: impl Fn(&str) -> bool,
) {
    let replaced = partial.commit_returning_replaced(file, overwrite);
    if let Some(old) = replaced.and_then(read_manifest) {
        for part in manifest_parts(&old) {
            if !still_listed(&part) {
                let _ = directory.unlink(OsStr::new(&part));
            }
        }
    }
}

/// A reader of the file (or object) `name` of a directory export.
pub type OpenListed<'a> = dyn FnMut(&str) -> std::io::Result<Box<dyn std::io::Read>> + 'a;

/// Check every part of a directory export against the manifest and its own
/// footer, reading each file with `open`. Returns (ok, parts, rows,
/// detail); never raises for bad contents.
pub fn verify_directory(
    open: &mut OpenListed<'_>,
    interrupt: &mut dyn FnMut(),
) -> (bool, i32, i64, String) {
    let manifest = match open(MANIFEST) {
        Ok(file) => match read_manifest(file) {
            Some(value) => value,
            None => return (false, 0, 0, "manifest.json is not valid JSON".into()),
        },
        Err(e) => return (false, 0, 0, format!("cannot read manifest.json: {e}")),
    };
    let Some(parts) = manifest["parts"].as_array() else {
        return (false, 0, 0, "manifest.json has no parts".into());
    };
    let count = parts.len() as i32;
    let mut rows = 0i64;
    for part in parts {
        let name = part["file"].as_str().unwrap_or("");
        if !is_part_file_name(name) {
            return (
                false,
                count,
                rows,
                format!("\"{name}\" is not a part file name"),
            );
        }
        let verdict = match open(name).and_then(|file| crate::verify::verify(file, interrupt)) {
            Ok(verdict) => verdict,
            Err(e) => return (false, count, rows, format!("{name}: cannot be read: {e}")),
        };
        if !verdict.ok {
            return (false, count, rows, format!("{name}: {}", verdict.detail));
        }
        let expected = (part["rows"].as_u64(), part["crc32"].as_str());
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
    if manifest["totals"]["rows"].as_i64() != Some(rows) {
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

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn part_names_carry_the_export_id() {
        let name = part_name("0123456789ab", 7, true);
        assert_eq!(name, "part-0123456789ab-00007.ndjson.gz");
        assert_eq!(
            export_id_of_part(name.as_bytes()),
            Some(&b"0123456789ab"[..])
        );
        assert_eq!(
            export_id_of_part(b"part-0123456789ab-00007.ndjson.partial"),
            Some(&b"0123456789ab"[..])
        );
        for other in [
            &b"part-00007.ndjson"[..],
            b"manifest.json",
            b"part-0123456789ab-0007.ndjson",
            b"part-0123456789zz-00007.ndjson",
            b"notes.txt",
        ] {
            assert_eq!(export_id_of_part(other), None);
        }
        assert!(is_part_file_name("part-00007.ndjson.gz"));
        assert!(is_part_file_name(&name));
        for bad in [
            "../part-00001.ndjson",
            "/etc/passwd",
            "part-1.ndjson",
            "manifest.json",
        ] {
            assert!(!is_part_file_name(bad), "{bad}");
        }
    }
}
