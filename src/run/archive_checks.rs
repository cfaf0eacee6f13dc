//! What an archive checks before it deletes anything: that deleting the
//! exported rows changes nothing else (no foreign key that cascades to rows
//! it did not export, no inheritance child, no DELETE trigger or rule), and
//! that every line it wrote reads back into exactly the row it deletes.
//!
//! The definition checks run at the start of every chunk, with the table
//! held in ROW EXCLUSIVE mode: `CREATE TRIGGER`, `CREATE RULE` and a new
//! foreign key to the table all wait for the chunk to commit, so what was
//! checked is what the chunk's DELETE meets.

use std::io::{BufRead, BufReader};

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::destination::ExportDirectory;
use crate::engine::scan::select_first_row;
use crate::error::raise;
use crate::ident::quote_identifier;

/// Lines read back per query: enough to amortise the query, few enough to
/// keep memory flat whatever the chunk's size.
const LINES_PER_BATCH: usize = 1000;
/// Bytes of lines read back per query, at most (one longer line goes
/// alone).
const BYTES_PER_BATCH: usize = 8 << 20;
/// How much of a value an error shows.
const SHOWN_CHARS: usize = 200;

/// The table an archive deletes from, as its checks need it.
pub struct ArchivedTable<'a> {
    pub oid: pg_sys::Oid,
    /// The quoted, schema-qualified name.
    pub name: &'a str,
    /// The key column, unquoted.
    pub key: &'a str,
    pub condition: Option<&'a str>,
}

/// A foreign key whose `ON DELETE` action changes rows of another table
/// (or of this one) when a referenced row is deleted.
struct CascadingKey {
    constraint: String,
    /// The referencing table, quoted and qualified.
    referencing: String,
    /// Whether the referencing table is the archived one, a partition of
    /// it or one of its ancestors (a self-reference).
    same_table: bool,
    action: &'static str,
    referencing_columns: Vec<String>,
    referenced_columns: Vec<String>,
}

impl ArchivedTable<'_> {
    /// The rows the archive takes, with the key range of one chunk when
    /// `range` (`$1`: last key, `$2`: the last key of the chunk before,
    /// when `lower`).
    pub fn rows_sql(&self, range: bool, lower: bool) -> String {
        format!(
            "SELECT * FROM {} WHERE {}",
            self.name,
            self.filter_sql(range, lower)
        )
    }

    /// The WHERE clause of [`Self::rows_sql`].
    fn filter_sql(&self, range: bool, lower: bool) -> String {
        let key = quote_identifier(self.key);
        let mut filter = String::new();
        if range {
            if lower {
                filter.push_str(&format!("{key} > $2 AND "));
            }
            filter.push_str(&format!("{key} <= $1 AND "));
        }
        format!("{filter}({}\n)", self.condition.unwrap_or("true"))
    }

    /// Refuse a table whose DELETE would do more than remove the exported
    /// rows: an inheritance parent (its DELETE removes the children's rows,
    /// whose own columns the export does not have), a DELETE trigger or
    /// rule (it may keep, change or remove other rows), and a foreign key
    /// that would cascade to, null or default a row that is not archived
    /// with it (checked for the whole condition when `chunk` is `None`,
    /// else for the chunk's key range). Raised before the chunk's DELETE,
    /// and for the first chunk before anything is written.
    pub fn check_definition(&self, chunk: Option<&[DatumWithOid<'_>]>) {
        let oid = self.oid;
        if first_text(
            "SELECT pg_catalog.current_setting('session_replication_role') \
             WHERE pg_catalog.current_setting('session_replication_role') <> 'origin'",
            &[],
        )
        .is_some()
        {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "cannot archive {} with session_replication_role other than origin",
                    self.name
                ),
                Some("foreign keys and triggers do not act then, so the DELETE could leave references to rows that are gone; archive with session_replication_role = origin"),
            );
        }
        if let Some(child) = first_text(
            "SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_inherits i \
             JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
             JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1 AND p.relkind = 'r' ORDER BY 1 LIMIT 1",
            &[oid.into()],
        ) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot archive {}: table {child} inherits from it, and its DELETE would remove the rows of {child} with columns the archive does not export",
                    self.name
                ),
                Some("archive each table of the hierarchy by itself, the children first; the parent's own rows can be archived once no table inherits from it"),
            );
        }
        if let Some((trigger, on)) = first_pair(
            "SELECT t.tgname::text, t.tgrelid::pg_catalog.regclass::text FROM pg_catalog.pg_trigger t \
             WHERE t.tgrelid IN (SELECT $1 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_tree($1)) \
             AND NOT t.tgisinternal AND (t.tgtype & 8) <> 0 AND t.tgenabled <> 'D' \
             ORDER BY 2, 1 LIMIT 1",
            &[oid.into()],
        ) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot archive {}: trigger \"{trigger}\" on {on} fires on DELETE, and may keep, change or remove rows the archive did not export",
                    self.name
                ),
                Some("archive with the trigger disabled (ALTER TABLE ... DISABLE TRIGGER ...), or move rows with a DELETE of your own"),
            );
        }
        if let Some((rule, on)) = first_pair(
            "SELECT r.rulename::text, r.ev_class::pg_catalog.regclass::text FROM pg_catalog.pg_rewrite r \
             WHERE r.ev_class IN (SELECT $1 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_tree($1)) \
             AND r.ev_type = '4' ORDER BY 2, 1 LIMIT 1",
            &[oid.into()],
        ) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot archive {}: rule \"{rule}\" on {on} rewrites its DELETE",
                    self.name
                ),
                Some("a rule can make the DELETE remove other rows than the exported ones, or none; drop it for the archive"),
            );
        }
        for key in self.cascading_keys() {
            self.check_cascade(&key, chunk);
        }
    }

    /// The foreign keys that reference the table (or a partition of it, or
    /// an ancestor it is a partition of) with `ON DELETE CASCADE`,
    /// `SET NULL` or `SET DEFAULT`, each as declared (its clones on the
    /// partitions of a partitioned table are the same key; one declared on
    /// a partition counts too).
    fn cascading_keys(&self) -> Vec<CascadingKey> {
        let sql = "SELECT DISTINCT ON (c.conrelid, c.conname) \
                c.conname::text, c.conrelid::pg_catalog.regclass::text, \
                c.conrelid IN (SELECT $1 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_tree($1) \
                               UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_ancestors($1)), \
                c.confdeltype::text, \
                ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(c.conkey) WITH ORDINALITY k(n, o) \
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), \
                ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(c.confkey) WITH ORDINALITY k(n, o) \
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o) \
             FROM pg_catalog.pg_constraint c \
             WHERE c.contype = 'f' AND c.confdeltype IN ('c', 'n', 'd') AND c.conparentid = 0 \
             AND c.confrelid IN (SELECT $1 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_tree($1) \
                                 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_ancestors($1)) \
             ORDER BY c.conrelid, c.conname";
        let keys = pgrx::spi::Spi::connect(|client| {
            let mut keys = Vec::new();
            for row in client.select(sql, None, &[self.oid.into()])? {
                let action = match row.get::<String>(4)?.as_deref() {
                    Some("c") => "ON DELETE CASCADE",
                    Some("n") => "ON DELETE SET NULL",
                    _ => "ON DELETE SET DEFAULT",
                };
                keys.push(CascadingKey {
                    constraint: row.get::<String>(1)?.unwrap_or_default(),
                    referencing: row.get::<String>(2)?.unwrap_or_default(),
                    same_table: row.get::<bool>(3)?.unwrap_or(false),
                    action,
                    referencing_columns: row.get::<Vec<String>>(5)?.unwrap_or_default(),
                    referenced_columns: row.get::<Vec<String>>(6)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::SpiError>(keys)
        });
        keys.unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("catalog query failed: {e}"),
                None,
            )
        })
    }

    /// Refuse when deleting the archived rows (all that match, or the
    /// chunk's) would make `key` change a row that is not archived with
    /// them: a referencing row of another table, or of this one outside
    /// the archived rows.
    fn check_cascade(&self, key: &CascadingKey, chunk: Option<&[DatumWithOid<'_>]>) {
        let columns = |alias: &str, names: &[String]| -> String {
            names
                .iter()
                .map(|n| format!("{alias}.{}", quote_identifier(n)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let archived = self.rows_sql(chunk.is_some(), chunk.is_some_and(|args| args.len() > 1));
        let mut sql = format!(
            "SELECT ROW({})::text FROM {} AS pg_stream_export_referencing \
             WHERE ({}) IN (SELECT {} FROM ({archived}) AS pg_stream_export_archived)",
            columns("pg_stream_export_referencing", &key.referencing_columns),
            key.referencing,
            columns("pg_stream_export_referencing", &key.referencing_columns),
            columns("pg_stream_export_archived", &key.referenced_columns),
        );
        if key.same_table {
            // By row identity: a key is unique only within the archived
            // table, not across the partitions of an ancestor.
            let (range, lower) = (chunk.is_some(), chunk.is_some_and(|args| args.len() > 1));
            sql.push_str(&format!(
                " AND (pg_stream_export_referencing.tableoid, pg_stream_export_referencing.ctid) NOT IN \
                 (SELECT tableoid, ctid FROM {} WHERE {})",
                self.name,
                self.filter_sql(range, lower)
            ));
        }
        // The cascade runs as the referencing table's owner, without its
        // row-level security: rows the caller cannot see would go too.
        let hidden = select_first_row(
            "SELECT pg_catalog.row_security_active($1::pg_catalog.regclass)",
            &[key.referencing.as_str().into()],
            |row| row.get::<bool>(1),
        )
        .flatten()
        .unwrap_or(true);
        if hidden {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "cannot archive {}: foreign key \"{}\" of {} ({}) would change rows that row-level security on {} hides from this role",
                    self.name, key.constraint, key.referencing, key.action, key.referencing
                ),
                Some("archive as a role that sees every row of the referencing table (its owner, or one with BYPASSRLS)"),
            );
        }
        sql.push_str(" LIMIT 1");
        let Some(values) = first_text(&sql, chunk.unwrap_or(&[])) else {
            return;
        };
        let whose = if key.same_table {
            "rows of the same table that are not archived with them"
        } else {
            "rows that are not archived"
        };
        raise(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!(
                "cannot archive {}: foreign key \"{}\" of {} ({}) would change {whose}: the rows of {} with ({}) = {}",
                self.name,
                key.constraint,
                key.referencing,
                key.action,
                key.referencing,
                key.referencing_columns.join(", "),
                shown(&values),
            ),
            Some(&format!(
                "archive the referencing rows of {} first (CALL stream_export_archive on that table, with a condition that selects them), then this table; nothing of this chunk was deleted",
                key.referencing
            )),
        );
    }

    /// Read the first `rows` lines of the part `name` back from where it
    /// was put, turn each back into a row of the table
    /// (`json_populate_record`) and compare it with the table's row of the
    /// same key: byte for byte (`*=`, cheap), and where that differs every
    /// column by its text form (a NaN's bits may differ): a value JSON cannot carry
    /// exactly (a non-default array lower bound, a rounded float) is an
    /// error naming the key and the column, raised before anything of the
    /// chunk is deleted. Returns the sum of the keys' hashes, which the
    /// DELETE must match.
    pub fn check_lines_restore(
        &self,
        directory: &ExportDirectory,
        name: &str,
        rows: u64,
    ) -> String {
        let failed = |detail: String| -> ! {
            // A read stopped by a cancel or timeout fails as that (57014).
            pgrx::check_for_interrupts!();
            raise(
                PgSqlErrorCode::ERRCODE_IO_ERROR,
                format!("archive part \"{name}\" cannot be read back: {detail}; none of its rows were deleted"),
                None,
            )
        };
        let input = directory
            .open_file(name)
            .unwrap_or_else(|e| failed(e.to_string()));
        let (_, decoded) =
            crate::sink::verify::decoded(input).unwrap_or_else(|e| failed(e.to_string()));
        let mut reader = BufReader::new(decoded);
        let key = quote_identifier(self.key);
        let sql = format!(
            "SELECT pg_catalog.min(l.n) FILTER (WHERE t.{key} IS NULL \
                    OR (NOT (t.* OPERATOR(pg_catalog.*=) r.*) \
                        AND ROW(t.*)::text IS DISTINCT FROM ROW(r.*)::text)), \
                    pg_catalog.sum(pg_catalog.hashtextextended(r.{key}::text, 0)::numeric)::text \
             FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS l(line, n) \
             CROSS JOIN LATERAL pg_catalog.json_populate_record(NULL::{table}, l.line::json) AS r \
             LEFT JOIN {table} AS t ON t.{key} = r.{key}",
            table = self.name
        );
        let mut digest = Digest::default();
        let mut batch: Vec<String> = Vec::with_capacity(LINES_PER_BATCH);
        let mut batch_bytes = 0usize;
        let mut first_line = 1u64;
        let mut line = Vec::new();
        for _ in 0..rows {
            pgrx::check_for_interrupts!();
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .unwrap_or_else(|e| failed(e.to_string()));
            if n == 0 {
                failed("it has fewer lines than were written".into());
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            let text = String::from_utf8(std::mem::take(&mut line))
                .unwrap_or_else(|_| failed("a line is not UTF-8".into()));
            batch_bytes += text.len();
            batch.push(text);
            if batch.len() >= LINES_PER_BATCH || batch_bytes >= BYTES_PER_BATCH {
                let lines = batch.len() as u64;
                self.check_batch(&sql, &mut batch, first_line, &mut digest);
                first_line += lines;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.check_batch(&sql, &mut batch, first_line, &mut digest);
        }
        digest.total()
    }

    fn check_batch(
        &self,
        sql: &str,
        batch: &mut Vec<String>,
        first_line: u64,
        digest: &mut Digest,
    ) {
        // SAFETY: a fresh child of the current context, freed when dropped
        // at the end of the batch: the array of lines built for the query
        // goes with it (the results are Rust values), so memory stays that
        // of one batch whatever the chunk's size.
        let (bad, sum) = unsafe {
            pgrx::PgMemoryContexts::new("pg_stream_export archive check").switch_to(|_| {
                let lines: Vec<&str> = batch.iter().map(String::as_str).collect();
                select_first_row(sql, &[lines.into()], |row| {
                    Ok((row.get::<i64>(1)?, row.get::<String>(2)?))
                })
                .unwrap_or((None, None))
            })
        };
        if let Some(n) = bad {
            let index = (n.max(1) - 1) as usize;
            let line = batch.get(index).map(String::as_str).unwrap_or_default();
            self.not_exact(line, first_line + index as u64);
        }
        digest.add(sum);
        batch.clear();
    }

    /// The error for `line` (line `number` of the chunk), which does not
    /// read back into the row it came from: the key and the first column
    /// that differs.
    fn not_exact(&self, line: &str, number: u64) -> ! {
        let key = quote_identifier(self.key);
        let columns = attribute_names(self.oid);
        let differing = columns
            .iter()
            .map(|c| {
                let c = quote_identifier(c);
                format!("t.{c}::text IS DISTINCT FROM r.{c}::text")
            })
            .collect::<Vec<_>>();
        let pick = columns
            .iter()
            .zip(&differing)
            .map(|(name, test)| format!("CASE WHEN {test} THEN {} END", quote_literal(name)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT r.{key}::text, t.{key} IS NULL, \
                    (pg_catalog.array_remove(ARRAY[{pick}]::text[], NULL))[1] \
             FROM pg_catalog.json_populate_record(NULL::{table}, $1::json) AS r \
             LEFT JOIN {table} AS t ON t.{key} = r.{key}",
            table = self.name
        );
        let found = select_first_row(&sql, &[line.into()], |row| {
            Ok((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<bool>(2)?.unwrap_or(true),
                row.get::<String>(3)?,
            ))
        });
        let Some((key_text, missing, column)) = found else {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("archive line {number} does not read back into a row of {}; none of the chunk's rows were deleted", self.name),
                None,
            )
        };
        if missing {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!(
                    "archive line {number} reads back with {} = {}, a key {} does not hold; none of the chunk's rows were deleted",
                    self.key,
                    shown(&key_text),
                    self.name
                ),
                None,
            );
        }
        let column = column.unwrap_or_else(|| "(the row as a whole)".into());
        let values = if columns.contains(&column) {
            let c = quote_identifier(&column);
            select_first_row(
                &format!(
                    "SELECT t.{c}::text, r.{c}::text \
                     FROM pg_catalog.json_populate_record(NULL::{table}, $1::json) AS r \
                     JOIN {table} AS t ON t.{key} = r.{key}",
                    table = self.name
                ),
                &[line.into()],
                |row| Ok((row.get::<String>(1)?, row.get::<String>(2)?)),
            )
        } else {
            None
        };
        let detail = match values {
            Some((held, back)) => format!(
                "; the table holds {}, the line gives back {}",
                held.as_deref().map(shown).unwrap_or_else(|| "NULL".into()),
                back.as_deref().map(shown).unwrap_or_else(|| "NULL".into())
            ),
            None => String::new(),
        };
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "cannot archive {} exactly: the row with {} = {} does not come back from its line in column \"{column}\"{detail}; none of the chunk's rows were deleted",
                self.name,
                self.key,
                shown(&key_text),
            ),
            Some("JSON cannot carry this value exactly (for example an array whose lower bound is not 1); change the value, or export it with stream_export_to_file and delete it yourself"),
        )
    }

    /// Delete the chunk's rows (`args` as for [`Self::rows_sql`]) and
    /// return how many went and the sum of their keys' hashes.
    pub fn delete_sql(&self, lower: bool) -> String {
        let key = quote_identifier(self.key);
        let range = if lower {
            format!("{key} > $2 AND ")
        } else {
            String::new()
        };
        format!(
            "WITH pg_stream_export_deleted AS (DELETE FROM {} WHERE {range}{key} <= $1 AND ({}\n) RETURNING {key}) \
             SELECT pg_catalog.count(*), \
                    pg_catalog.sum(pg_catalog.hashtextextended({key}::text, 0)::numeric)::text \
             FROM pg_stream_export_deleted",
            self.name,
            self.condition.unwrap_or("true")
        )
    }

    /// Why a DELETE removed other rows than the export read (it cannot
    /// remove more under the chunk's snapshot): a row-level security policy
    /// that lets the role read rows it may not delete, or a condition that
    /// does not give the same rows each time. Neither goes away by trying
    /// again, so neither is a serialization failure.
    pub fn deleted_other_rows(&self, index: usize, name: &str, deleted: u64, exported: u64) -> ! {
        let policy = first_text(
            "SELECT p.polname::text FROM pg_catalog.pg_policy p \
             WHERE pg_catalog.row_security_active($1) \
             AND p.polrelid IN (SELECT $1 UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_tree($1) \
                                UNION ALL SELECT relid::oid FROM pg_catalog.pg_partition_ancestors($1)) \
             AND p.polcmd IN ('d', '*') ORDER BY 1 LIMIT 1",
            &[self.oid.into()],
        );
        let security = first_text(
            "SELECT 'row level security' WHERE pg_catalog.row_security_active($1)",
            &[self.oid.into()],
        );
        match (policy, security) {
            (policy, Some(_)) => raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "archive chunk {index} (\"{name}\"): the DELETE would remove {deleted} of the {exported} rows exported: row-level security on {} lets this role read rows it may not delete{}; none of them were deleted",
                    self.name,
                    policy.map(|p| format!(" (policy \"{p}\")")).unwrap_or_default()
                ),
                Some("archive as a role whose policies allow deleting every row it can read, or narrow the condition to those rows"),
            ),
            _ => raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "archive chunk {index} (\"{name}\"): the DELETE would remove other rows than the {exported} exported ({deleted}); none of them were deleted"
                ),
                Some("the condition must give the same rows every time it is evaluated (no random(), clock_timestamp() or other volatile functions)"),
            ),
        }
    }
}

/// The sum of the keys' hashes of a chunk's lines, batch by batch, as
/// PostgreSQL's numeric text (exact, whatever the count).
#[derive(Default)]
struct Digest {
    sums: Vec<String>,
}

impl Digest {
    fn add(&mut self, sum: Option<String>) {
        if let Some(sum) = sum {
            self.sums.push(sum);
        }
    }

    /// The total, added up by PostgreSQL as the DELETE's is.
    fn total(&self) -> String {
        let sums: Vec<String> = self.sums.clone();
        crate::engine::scan::select_one::<String>(
            "SELECT pg_catalog.sum(s::numeric)::text FROM pg_catalog.unnest($1::text[]) s",
            &[sums.into()],
        )
        .unwrap_or_default()
    }
}

fn first_text(sql: &str, args: &[DatumWithOid<'_>]) -> Option<String> {
    select_first_row(sql, args, |row| row.get::<String>(1)).flatten()
}

fn first_pair(sql: &str, args: &[DatumWithOid<'_>]) -> Option<(String, String)> {
    select_first_row(sql, args, |row| {
        Ok((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
        ))
    })
}

/// The table's columns, in order.
fn attribute_names(oid: pg_sys::Oid) -> Vec<String> {
    select_first_row(
        "SELECT ARRAY(SELECT attname::text FROM pg_catalog.pg_attribute \
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum)",
        &[oid.into()],
        |row| row.get::<Vec<String>>(1),
    )
    .flatten()
    .unwrap_or_default()
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A value as an error shows it: quoted, cut to a readable length.
fn shown(value: &str) -> String {
    let mut cut: String = value.chars().take(SHOWN_CHARS).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    format!("'{cut}'")
}
