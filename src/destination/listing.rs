//! A directory export's listing files in a server directory: reading the
//! manifest and a chunked export's journal, committing a manifest by
//! rename, and the part files that exports which died left behind.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use serde_json::Value;

use super::file::{remove_if_abandoned, Directory, Occupant, PartialFile};
use crate::layout::{
    export_id_of_part, is_part_file_name, manifest_parts, read_manifest, MANIFEST, PROGRESS,
};

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
