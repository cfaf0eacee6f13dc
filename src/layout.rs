//! The layout of an export written as several part files plus a
//! `manifest.json`, shared by the directory export and the chunked export:
//! the names of its files and reading a manifest's part list. A leaf: where
//! the files live (`crate::destination`) and how they are checked
//! (`crate::sink::verify`) build on it.

use pgrx::pg_sys;
use serde_json::Value;

/// The file that lists the parts; its arrival is an export's commit point.
pub const MANIFEST: &str = "manifest.json";
/// A chunked export's journal: a header line, then one line per finished
/// chunk, appended as each chunk is in place.
pub const PROGRESS: &str = "progress.jsonl";

/// A chunked export's journal header object under an object prefix.
pub const PROGRESS_HEADER: &str = "progress.json";

/// `part-<id>-NNNNN.ndjson[.gz|.zst]`: `suffix` is what the compression
/// adds after `.ndjson` (`Compression::file_suffix`).
pub fn part_name(export_id: &str, index: usize, suffix: &str) -> String {
    format!("part-{export_id}-{index:05}.ndjson{suffix}")
}

/// `name` without its `.ndjson[.gz|.zst]` ending, if it has one.
fn ndjson_stem(name: &[u8]) -> Option<&[u8]> {
    [b".ndjson.gz".as_slice(), b".ndjson.zst", b".ndjson"]
        .iter()
        .find_map(|ending| name.strip_suffix(*ending))
}

/// The export id in a part file name of this layout (with `.partial` or
/// not), or `None` for any other name.
pub fn export_id_of_part(name: &[u8]) -> Option<&[u8]> {
    let name = name.strip_suffix(b".partial").unwrap_or(name);
    let name = ndjson_stem(name)?;
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
    ndjson_stem(name.as_bytes())
        .and_then(|s| s.strip_prefix(b"part-"))
        .is_some_and(|n| n.len() == 5 && n.iter().all(u8::is_ascii_digit))
}

/// `archive-<id>-NNNNN.ndjson[.gz|.zst]`: chunk `index` of the archive
/// call `archive_id`. Not a part name of the directory layout, so that no
/// directory export in the same place ever removes it.
pub fn archive_part_name(archive_id: &str, index: usize, suffix: &str) -> String {
    format!("archive-{archive_id}-{index:05}.ndjson{suffix}")
}

/// The longest job name: it goes into file and object names.
pub const JOB_NAME_MAX: usize = 63;

/// Why `name` cannot name an incremental job, if it cannot: it becomes
/// part of file and object names, so it is kept to letters, digits, `_`,
/// `-` and `.` (starting with a letter or digit), and it may not start
/// with `part-`, so that its files never look like a directory export's
/// parts (which an overwrite of that export would remove).
pub fn job_name_problem(name: &str) -> Option<&'static str> {
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if !starts_well || name.len() > JOB_NAME_MAX {
        return Some("a job name is 1 to 63 characters and starts with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Some("a job name has only letters, digits, '_', '-' and '.'");
    }
    if name.to_ascii_lowercase().starts_with("part-") {
        return Some(
            "a job name may not start with \"part-\" (the names of directory export parts)",
        );
    }
    None
}

/// Why `id` cannot name a node of a cluster export, if it cannot: 1 to 63
/// letters, digits, `_`, `-` and `.`, starting with a letter or digit (it
/// becomes the directory `node-<id>/`).
pub fn node_id_problem(id: &str) -> Option<&'static str> {
    let starts_well = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !starts_well
        || id.len() > JOB_NAME_MAX
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Some("a node id is 1 to 63 letters, digits, '_', '-' and '.', starting with a letter or digit");
    }
    None
}

/// What every node directory of a cluster export starts with.
pub const NODE_DIRECTORIES: &str = "node-";

/// The directory of node `id` in a cluster export, with its slash: it
/// holds a directory export of the node per cluster export run
/// ([`node_run_directory`]).
pub fn node_directory(id: &str) -> String {
    format!("{NODE_DIRECTORIES}{id}/")
}

/// The directory of node `id`'s export for the cluster export run
/// `export_id`, relative to the cluster export's prefix: every run writes
/// into new directories, so that the export it replaces stays whole until
/// the new manifest of manifests is in place.
pub fn node_run_directory(id: &str, export_id: &str) -> String {
    format!("{}{export_id}/", node_directory(id))
}

/// Is `text` an export id (12 lower-case hexadecimal digits, as
/// [`new_export_id`] makes them)?
pub fn is_export_id(text: &str) -> bool {
    text.len() == 12
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Is `directory` one a manifest of manifests may give for node `id`: its
/// run directory, or (cluster exports before 0.4.0) the node directory?
pub fn is_node_export_directory(id: &str, directory: &str) -> bool {
    let node = node_directory(id);
    directory == node
        || directory
            .strip_prefix(&node)
            .and_then(|rest| rest.strip_suffix('/'))
            .is_some_and(is_export_id)
}

/// `<job>.job.json`: the small file or object that binds an incremental
/// job's destination to the job (its id, database and server), written by
/// its first run and checked by every run.
pub fn job_binding_name(job: &str) -> String {
    format!("{job}.job.json")
}

/// `<job>-NNNNNNNN.ndjson[.gz|.zst]`: part `number` of an incremental
/// job. Part n holds the rows after the last row of part n-1, so the name
/// follows from where the part starts: a run that died after writing it
/// and the run after it name it the same.
pub fn job_part_name(job: &str, number: i64, suffix: &str) -> String {
    format!("{job}-{number:08}.ndjson{suffix}")
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

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn node_ids_are_safe_directory_names() {
        for good in ["a", "shard-01", "eu.west_2", &"n".repeat(63)] {
            assert_eq!(node_id_problem(good), None, "{good}");
        }
        for bad in ["", "..", "-a", "a/b", "a b", "é", &"n".repeat(64)] {
            assert!(node_id_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(node_directory("a"), "node-a/");
    }

    #[test]
    fn a_node_export_lives_in_a_directory_of_its_run() {
        assert_eq!(
            node_run_directory("a", "0123456789ab"),
            "node-a/0123456789ab/"
        );
        assert!(is_node_export_directory("a", "node-a/0123456789ab/"));
        assert!(is_node_export_directory("a", "node-a/"));
        for bad in [
            "node-b/0123456789ab/",
            "node-a/0123456789AB/",
            "node-a/0123456789a/",
            "node-a/../0123456789ab/",
            "node-a/0123456789ab",
            "node-a/0123456789ab/x/",
            "../elsewhere/",
        ] {
            assert!(!is_node_export_directory("a", bad), "{bad}");
        }
        assert!(is_export_id("deadbeef0123") && !is_export_id("deadbeef012"));
    }

    #[test]
    fn job_names_are_safe_in_file_names_and_never_look_like_parts() {
        for good in ["nightly", "events.daily", "a", "Job_2-x", &"x".repeat(63)] {
            assert_eq!(job_name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            "x\0",
            "part-1",
            "PART-x",
            &"x".repeat(64),
        ] {
            assert!(job_name_problem(bad).is_some(), "{bad:?}");
        }
        assert!(!is_part_file_name(&job_part_name("part0", 1, ".gz")));
        assert!(!is_part_file_name(&job_part_name("0123456789ab", 1, "")));
        let archived = archive_part_name("0123456789ab", 3, ".zst");
        assert_eq!(archived, "archive-0123456789ab-00003.ndjson.zst");
        assert!(!is_part_file_name(&archived));
    }

    #[test]
    fn job_part_names_follow_the_part_number() {
        assert_eq!(job_part_name("events", 1, ""), "events-00000001.ndjson");
        assert_eq!(
            job_part_name("events", 42, ".zst"),
            "events-00000042.ndjson.zst"
        );
        assert_eq!(
            job_part_name("e", 123_456_789, ".gz"),
            "e-123456789.ndjson.gz"
        );
    }

    #[test]
    fn part_names_carry_the_export_id() {
        let name = part_name("0123456789ab", 7, ".gz");
        assert_eq!(name, "part-0123456789ab-00007.ndjson.gz");
        let zstd = part_name("0123456789ab", 7, ".zst");
        assert_eq!(
            export_id_of_part(zstd.as_bytes()),
            Some(&b"0123456789ab"[..])
        );
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
