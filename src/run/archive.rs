//! Archival: export the rows of a table that match a condition, chunk by
//! chunk in key order, read each chunk back from where it was written and
//! check it, and only then delete exactly its rows; one transaction per
//! chunk.
//!
//! Each chunk runs under one REPEATABLE READ snapshot: the export reads
//! the chunk's rows, and the DELETE, under the same snapshot, removes the
//! rows with keys in the chunk's range that match the condition, which are
//! the rows exported. A row inserted after the snapshot is invisible to
//! both, so it stays; a row updated or deleted by another transaction
//! after the snapshot makes the DELETE fail with `40001` (PostgreSQL's
//! serialization failure), which rolls the chunk back: nothing is deleted
//! that was not exported as it is now. Before the DELETE, every line is
//! read back and turned into a row that must equal the row it came from,
//! and the DELETE must change nothing but those rows
//! ([`super::archive_checks`]); it must remove exactly the exported keys
//! (their count and the sum of their hashes), or the chunk is rolled back.
//! Floats are written with at least `extra_float_digits = 1`, the
//! shortest text that reads back exactly. The chunk's record in
//! `stream_export_archive_part` commits with its DELETE, so the catalog
//! lists exactly the chunks whose rows are gone.

use pgrx::prelude::*;
use pgrx::spi::Spi;
use pgrx::PgMemoryContexts;

use super::archive_checks::ArchivedTable;
use super::catalog::{catalog_failed, catalog_schema};
use super::chunked::{chunk_snapshot, CommittingSpi};
use super::{to_part_if_any, Counts};
use crate::activity::{Description, Tracked};
use crate::destination::ExportDirectory;
use crate::engine::export::{relation_row_estimate, Export, KeyParam};
use crate::engine::scan::select_one;
use crate::engine::source::Source;
use crate::error::raise;
use crate::layout::{archive_part_name, new_export_id};
use crate::options::ExportOptions;
use crate::progress::Destination;

/// Rows per chunk when `chunk_rows` is not given: each chunk holds its
/// snapshot and its rows' locks until it commits, so chunks stay short.
pub const DEFAULT_CHUNK_ROWS: u64 = 100_000;

/// What one call archived.
pub struct ArchiveTotals {
    pub archive_id: String,
    pub chunks: u64,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
}

/// The table behind `source`, which must be a plain or partitioned table
/// (`42809` otherwise), and the DELETE privilege on it (`42501`), checked
/// before anything is written.
fn archived_table(source: &str) -> Source {
    let resolved = Source::resolve(source);
    let Source::Relation { oid, .. } = &resolved else {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "stream_export_archive needs a table, not a query",
            Some("name the table in source, and the rows to archive in condition"),
        )
    };
    let kind: Option<String> = select_one(
        "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = $1",
        &[(*oid).into()],
    );
    if !matches!(kind.as_deref(), Some("r" | "p")) {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!(
                "\"{}\" is not a table: stream_export_archive deletes what it archived",
                resolved.canonical()
            ),
            Some("archive a table or a partition; export a view with the other functions"),
        );
    }
    let may_delete: Option<bool> = select_one(
        "SELECT pg_catalog.has_table_privilege($1, 'DELETE')",
        &[(*oid).into()],
    );
    if may_delete != Some(true) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "permission denied to delete from \"{}\"",
                resolved.canonical()
            ),
            Some(
                "stream_export_archive deletes the rows it archived: it needs DELETE on the table",
            ),
        );
    }
    resolved
}

/// One call's fixed parts.
struct Archive<'a> {
    /// What is exported: the table, or the rows matching the condition.
    rows: Source,
    options: ExportOptions,
    directory: &'a ExportDirectory,
    chunk_rows: u64,
    /// As given, for the catalog.
    source: &'a str,
    key: String,
    condition: Option<&'a str>,
    /// The table's quoted name, for the DELETE.
    table: String,
    oid: pg_sys::Oid,
    archive_id: String,
}

/// Where the last chunk ended: its token, last key, and that key as text.
struct Position {
    token: String,
    last_key: KeyParam,
    last_key_text: String,
}

/// Archive the rows of `source` that match `condition` into `directory`
/// (see the module's comment). The caller has checked that the CALL may
/// commit, and `options` (key, footer).
pub fn archive(
    source: &str,
    directory: &ExportDirectory,
    condition: Option<&str>,
    chunk_rows: u64,
    options: ExportOptions,
) -> ArchiveTotals {
    let key = options.key.clone().unwrap_or_default();
    let table = archived_table(source);
    let qualified_name = table.canonical().to_owned();
    let oid = table.relation_oid();
    let rows = table.rows_where(condition);
    // The key and the options are checked before anything is written.
    drop(Export::open(
        rows.clone(),
        options.clone(),
        Destination::File,
    ));
    let job = Archive {
        rows,
        options,
        directory,
        chunk_rows,
        source,
        key,
        condition,
        table: qualified_name,
        oid,
        archive_id: new_export_id(),
    };
    let mut totals = ArchiveTotals {
        archive_id: job.archive_id.clone(),
        chunks: 0,
        rows: 0,
        bytes: 0,
        file_bytes: 0,
    };
    // One export in stream_export_activity from the first chunk to the
    // last, as a chunked export shows.
    let mut tracked = Some(Tracked::start(Description {
        source: job.rows.description(),
        destination: directory.describe(),
        format: format!("archive {} chunk_rows={chunk_rows}", job.options.describe()),
        estimated_rows: relation_row_estimate(job.rows.relation_oid()),
    }));
    let mut after: Option<Position> = None;
    let mut spi = CommittingSpi::connect();
    loop {
        spi.begin_chunk();
        // SAFETY: the context is a fresh child of the current one, freed
        // when dropped after the chunk; nothing allocated in it is used
        // after that (the chunk's results are Rust values).
        let chunk = unsafe {
            PgMemoryContexts::new("pg_stream_export archive chunk")
                .switch_to(|_| job.chunk(&totals, after.as_ref(), &mut tracked))
        };
        spi.end_chunk();
        let Some((counts, position)) = chunk else {
            break;
        };
        totals.chunks += 1;
        totals.rows += counts.rows;
        totals.bytes += counts.bytes;
        totals.file_bytes += counts.file_bytes;
        if let Some(tracked) = &mut tracked {
            tracked.written(totals.file_bytes);
        }
        after = Some(position);
        if counts.rows < job.chunk_rows {
            break;
        }
    }
    spi.finish();
    if let Some(tracked) = &mut tracked {
        tracked.job_progress(totals.rows, totals.bytes);
        tracked.written(totals.file_bytes);
        tracked.complete(None);
    }
    totals
}

impl Archive<'_> {
    fn checks(&self) -> ArchivedTable<'_> {
        ArchivedTable {
            oid: self.oid,
            name: &self.table,
            key: &self.key,
            condition: self.condition,
        }
    }

    /// Archive the next chunk, the rows after `after`: in place, checked,
    /// deleted and recorded (all committed with the chunk's transaction).
    /// `None` when no row is left.
    fn chunk(
        &self,
        totals: &ArchiveTotals,
        after: Option<&Position>,
        tracked: &mut Option<Tracked>,
    ) -> Option<(Counts, Position)> {
        let index = totals.chunks as usize;
        let (snapshot, _) = chunk_snapshot();
        let checks = self.checks();
        // CREATE TRIGGER, CREATE RULE and a new foreign key to the table
        // wait for this chunk now, so what is checked below holds for its
        // DELETE.
        Spi::run(&format!("LOCK TABLE {} IN ROW EXCLUSIVE MODE", self.table))
            .unwrap_or_else(|e| catalog_failed(e));
        if index == 0 {
            // Before anything is written: every row that matches.
            checks.check_definition(None);
        }
        // Lines that read back the same in any session: floats in their
        // shortest exact text, intervals in the style whose fields carry
        // their own signs (sql_standard's "-1 2:00:00" means another
        // interval under other styles), money in the C locale's format.
        Spi::run(
            "SELECT pg_catalog.set_config('extra_float_digits', '1', true) \
             WHERE pg_catalog.current_setting('extra_float_digits')::integer < 1",
        )
        .and_then(|_| Spi::run("SELECT pg_catalog.set_config('IntervalStyle', 'postgres', true)"))
        .and_then(|_| Spi::run("SELECT pg_catalog.set_config('lc_monetary', 'C', true)"))
        .unwrap_or_else(|e| catalog_failed(e));
        let mut options = self.options.clone();
        options.after = after.map(|p| p.token.clone());
        let name = archive_part_name(&self.archive_id, index, options.compression.file_suffix());
        let mut export = Export::open(self.rows.clone(), options, Destination::File);
        if let Some(tracked) = tracked.take() {
            export.count_in(tracked, (totals.rows, totals.bytes));
        }
        let written = to_part_if_any(self.directory, &mut export, &name, self.chunk_rows);
        *tracked = export.release_tracked();
        let counts = written?;
        let (Some(last_key), Some(last_key_text), Some(token)) = (
            export.last_key_param(),
            export.last_key_text(),
            export.resume_token(),
        ) else {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "an archive chunk has rows but no last key",
                None,
            )
        };
        drop(export);
        check_in_place(self.directory, &name, index, &counts);
        let exported_keys = checks.check_lines_restore(self.directory, &name, counts.rows);
        let range = || {
            let mut args = vec![last_key.arg()];
            if let Some(lower) = after {
                args.push(lower.last_key.arg());
            }
            args
        };
        let args = range();
        checks.check_definition(Some(args.as_slice()));
        let (deleted, deleted_keys) = Spi::connect_mut(|client| {
            let table = client.update(&checks.delete_sql(after.is_some()), Some(1), &range())?;
            let row = table.first();
            Ok::<_, pgrx::spi::SpiError>((
                row.get::<i64>(1)?.unwrap_or(0) as u64,
                row.get::<String>(2)?.unwrap_or_default(),
            ))
        })
        .unwrap_or_else(|e| catalog_failed(e));
        if deleted != counts.rows || deleted_keys != exported_keys {
            checks.deleted_other_rows(index, &name, deleted, counts.rows);
        }
        let target = match self.directory {
            ExportDirectory::Server(dir) => dir.path().join(&name).display().to_string(),
            ExportDirectory::Prefix(prefix) => prefix.uri.join(&name).to_string(),
        };
        Spi::connect_mut(|client| {
            let schema = catalog_schema(client)?;
            client.update(
                &format!(
                    "INSERT INTO {schema}.stream_export_archive_part \
                     (archive_id, part, source, key, condition, target, after_key, last_key, \
                      rows, bytes, file_bytes, crc32, snapshot) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ),
                None,
                &[
                    self.archive_id.as_str().into(),
                    (index as i32).into(),
                    self.source.into(),
                    self.key.as_str().into(),
                    self.condition.into(),
                    target.into(),
                    after.map(|p| p.last_key_text.as_str()).into(),
                    last_key_text.as_str().into(),
                    (counts.rows as i64).into(),
                    (counts.bytes as i64).into(),
                    (counts.file_bytes as i64).into(),
                    format!("{:08x}", counts.crc32).into(),
                    snapshot.into(),
                ],
            )?;
            Ok(())
        })
        .unwrap_or_else(|e| catalog_failed(e));
        Some((
            counts,
            Position {
                token,
                last_key,
                last_key_text,
            },
        ))
    }
}

/// Read the chunk `name` back from where it was put and check it against
/// what was written: its footer, row count and CRC-32. Anything else is an
/// error naming the chunk, raised before any of its rows are deleted.
fn check_in_place(directory: &ExportDirectory, name: &str, index: usize, counts: &Counts) {
    let failed = |detail: String| -> ! {
        // A read stopped by a cancel or timeout fails as that (57014), not
        // as the storage's fault.
        pgrx::check_for_interrupts!();
        raise(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("archive chunk {index} (\"{name}\") did not verify: {detail}; none of its rows were deleted"),
            Some("the file or object as written is not what was read back; check the storage, then CALL again (rows already archived stay archived)"),
        )
    };
    let reader = directory
        .open_file(name)
        .unwrap_or_else(|e| failed(format!("cannot read it back: {e}")));
    let verdict = crate::sink::verify::verify(reader, &mut || {
        pgrx::check_for_interrupts!();
    })
    .unwrap_or_else(|e| failed(format!("cannot read it back: {e}")));
    if !verdict.ok {
        failed(verdict.detail);
    }
    if verdict.rows != counts.rows || verdict.crc32 != counts.crc32 {
        failed(format!(
            "read back {} rows with CRC-32 {:08x}, wrote {} rows with CRC-32 {:08x}",
            verdict.rows, verdict.crc32, counts.rows, counts.crc32
        ));
    }
}
