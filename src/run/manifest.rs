//! The manifest of a directory or chunked export and the chunked export's
//! journal, as typed records: what each export writes is declared once
//! here, and both kinds of export write their manifest with
//! [`write_manifest`], which streams the part list (a chunked export's can
//! be as long as its journal, and is never held in memory whole).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;

use serde::ser::{Error as _, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

/// The version of the manifest's format (`pg_stream_export_manifest`).
pub const MANIFEST_VERSION: u32 = 1;
/// The version of the journal's format (`pg_stream_export_progress`).
pub const JOURNAL_VERSION: u32 = 1;

/// How the parts of an export relate to one another in time.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Every part read one snapshot (a directory export).
    Snapshot,
    /// Each chunk read its own snapshot (a chunked export).
    PerChunk,
    /// Each node's directory export read one snapshot of that node; there
    /// is none across nodes (a cluster export's manifest of manifests).
    PerNode,
}

/// A directory export as a whole.
#[derive(Serialize, Debug)]
pub struct SnapshotExport {
    pub consistency: Consistency,
    pub export_id: String,
    pub source: String,
    pub key: String,
    pub compression: String,
    pub snapshot: String,
    pub snapshot_time: String,
}

/// One part of a directory export: a key range read under the export's
/// snapshot.
#[derive(Serialize, Debug)]
pub struct PartitionPart {
    pub partition: usize,
    pub file: String,
    pub key_from: Option<String>,
    pub key_to: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    pub crc32: String,
}

/// A chunked export as a whole: the journal's header, and the manifest's
/// opening. Read back from a journal an earlier version may have written,
/// so what it did not record is `None` (or empty).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ChunkedExport {
    pub consistency: Consistency,
    pub export_id: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub compression: Option<String>,
    #[serde(default)]
    pub compression_level: Option<i64>,
    #[serde(default)]
    pub footer: Option<bool>,
    /// Every type option, on or off (see [`crate::options::JsonStyle`]).
    #[serde(default)]
    pub style: BTreeMap<String, bool>,
    #[serde(default)]
    pub chunk_rows: Option<u64>,
    #[serde(default)]
    pub started_at: Option<String>,
}

/// The journal's first line.
#[derive(Serialize, Deserialize, Debug)]
pub struct JournalHeader {
    pub pg_stream_export_progress: u32,
    #[serde(flatten)]
    pub export: ChunkedExport,
}

/// A finished chunked export, as its manifest opens.
#[derive(Serialize, Debug)]
pub struct FinishedChunks<'a> {
    #[serde(flatten)]
    pub export: &'a ChunkedExport,
    pub complete: bool,
    pub finished_at: String,
}

/// One chunk: a journal line, and a part of the chunked manifest.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct ChunkPart {
    pub chunk: usize,
    pub file: String,
    /// The last key of the chunk before (none for the first).
    pub after_key: Option<String>,
    pub last_key: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    pub crc32: String,
    pub snapshot: String,
    pub snapshot_xmin: String,
    pub transaction_started_at: String,
    pub resume_token: Option<String>,
    /// This chunk reached the end of the source.
    pub to_end: bool,
}

/// A cluster export as a whole: what was asked, and each node's export.
#[derive(Serialize, Debug)]
pub struct ClusterExport {
    pub consistency: Consistency,
    pub export_id: String,
    pub source: String,
    pub key: String,
    pub compression: String,
    pub compression_level: u32,
    pub partitions_per_node: usize,
    pub started_at: String,
    pub finished_at: String,
    pub nodes: Vec<NodeExport>,
}

/// One node's directory export, as the manifest of manifests lists it.
#[derive(Serialize, Debug, Clone)]
pub struct NodeExport {
    pub node: String,
    /// The node's directory, relative to the cluster export's prefix.
    pub directory: String,
    /// Its `manifest.json`, relative to the prefix: size and CRC-32 of its
    /// bytes, so a changed node manifest is found.
    pub manifest: String,
    pub manifest_bytes: u64,
    pub manifest_crc32: String,
    pub export_id: String,
    pub snapshot: String,
    pub snapshot_time: String,
    pub partitions: usize,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    /// Exported by an earlier call with the same arguments, and verified.
    pub reused: bool,
}

/// One part of a node's export, listed in the manifest of manifests with
/// its path relative to the prefix, so one list reads the whole dataset.
#[derive(Serialize, Debug, Clone)]
pub struct NodePart {
    pub node: String,
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    pub crc32: String,
}

/// Sums over the parts.
#[derive(Serialize, Debug, Default)]
pub struct Totals {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
}

/// A manifest: the export `E` as a whole, its totals and its parts, which
/// are written one by one as `parts` yields them.
#[derive(Serialize)]
struct Manifest<'a, E, S> {
    pg_stream_export_manifest: u32,
    #[serde(flatten)]
    export: &'a E,
    totals: &'a Totals,
    parts: S,
}

/// Serialises the items of an iterator as a JSON array without collecting
/// them; an item's error ends the manifest with that error.
struct Streamed<I>(RefCell<Option<I>>);

impl<I, T> Serialize for Streamed<I>
where
    I: Iterator<Item = io::Result<T>>,
    T: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let items = self
            .0
            .borrow_mut()
            .take()
            .ok_or_else(|| S::Error::custom("the parts were written already"))?;
        let mut seq = serializer.serialize_seq(None)?;
        for item in items {
            seq.serialize_element(&item.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

/// Write the manifest of `export` into `out`: its totals and the `parts`,
/// streamed.
pub fn write_manifest<E, T>(
    out: &mut dyn io::Write,
    export: &E,
    totals: &Totals,
    parts: impl Iterator<Item = io::Result<T>>,
) -> io::Result<()>
where
    E: Serialize,
    T: Serialize,
{
    let manifest = Manifest {
        pg_stream_export_manifest: MANIFEST_VERSION,
        export,
        totals,
        parts: Streamed(RefCell::new(Some(parts))),
    };
    serde_json::to_writer_pretty(&mut *out, &manifest).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn chunked() -> ChunkedExport {
        ChunkedExport {
            consistency: Consistency::PerChunk,
            export_id: "0123456789ab".into(),
            source: Some("public.events".into()),
            key: Some("id".into()),
            compression: Some("none".into()),
            compression_level: Some(6),
            footer: Some(true),
            style: BTreeMap::from([("bytea_base64".to_string(), false)]),
            chunk_rows: Some(2),
            started_at: Some("2026-01-01T00:00:00.000000Z".into()),
        }
    }

    #[test]
    fn a_chunked_manifest_streams_its_parts_after_the_export() {
        let export = chunked();
        let finished = FinishedChunks {
            export: &export,
            complete: true,
            finished_at: "2026-01-01T00:00:01.000000Z".into(),
        };
        let parts = (0..3).map(|chunk| {
            Ok(ChunkPart {
                chunk,
                file: format!("part-0123456789ab-{chunk:05}.ndjson"),
                rows: 2,
                to_end: chunk == 2,
                ..ChunkPart::default()
            })
        });
        let totals = Totals {
            chunks: Some(3),
            rows: 6,
            ..Totals::default()
        };
        let mut out = Vec::new();
        write_manifest(&mut out, &finished, &totals, parts).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["pg_stream_export_manifest"], 1);
        assert_eq!(value["consistency"], "per_chunk");
        assert_eq!(value["complete"], true);
        assert_eq!(value["totals"]["chunks"], 3);
        assert!(value["totals"].get("partitions").is_none());
        assert_eq!(value["parts"].as_array().unwrap().len(), 3);
        assert_eq!(value["parts"][2]["to_end"], true);
        assert_eq!(value["parts"][0]["after_key"], serde_json::Value::Null);
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn an_error_of_a_part_ends_the_manifest_with_it() {
        let parts = vec![
            Ok(ChunkPart::default()),
            Err(io::Error::other("progress-0000000001.json is missing")),
        ];
        let mut out = Vec::new();
        let error = write_manifest(&mut out, &chunked(), &Totals::default(), parts.into_iter())
            .unwrap_err();
        assert!(error.to_string().contains("is missing"), "{error}");
    }

    #[test]
    fn a_journal_header_reads_back_and_tolerates_what_it_lacks() {
        let header = JournalHeader {
            pg_stream_export_progress: JOURNAL_VERSION,
            export: chunked(),
        };
        let text = serde_json::to_string(&header).unwrap();
        let back: JournalHeader = serde_json::from_str(&text).unwrap();
        assert_eq!(back.export.source.as_deref(), Some("public.events"));
        assert_eq!(back.export.style.get("bytea_base64"), Some(&false));
        let old: JournalHeader = serde_json::from_str(
            r#"{"pg_stream_export_progress":1,"consistency":"per_chunk","export_id":"x"}"#,
        )
        .unwrap();
        assert_eq!(old.export.compression_level, None);
        assert!(old.export.style.is_empty());
        assert!(serde_json::from_str::<JournalHeader>(
            r#"{"pg_stream_export_progress":1,"consistency":"snapshot"}"#
        )
        .is_err());
    }
}
