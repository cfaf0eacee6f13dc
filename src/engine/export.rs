//! One export: the source, its options, the row walk (a single portal, or
//! keyset batches `WHERE key > $1 ORDER BY key LIMIT $n`) and the encoder.
//! The SQL functions drive it batch by batch; it appends NDJSON lines to a
//! [`LineSink`].

use std::ffi::CStr;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::activity::{Description, Tracked};
use crate::encode::RowEncoder;
use crate::engine::scan::{row_context, Cursor};
use crate::engine::source::Source;
use crate::error::raise;
use crate::footer::Footer;
use crate::ident::quote_identifier;
use crate::options::{BatchSize, ExportOptions};
use crate::progress::{Destination, Progress};
use crate::sink::{ExportWriter, RecordStats};
use crate::token::{fingerprint, ResumeToken};

const SOURCE_ALIAS: &str = "pg_stream_export_source";

/// Receives encoded lines: the engine appends one line plus `\n` to
/// [`LineSink::buffer`] and then calls [`LineSink::line_done`].
pub trait LineSink {
    fn buffer(&mut self) -> &mut Vec<u8>;
    /// `start` is where the line (including its newline) begins in the buffer.
    fn line_done(&mut self, start: usize);
}

/// A key value copied out of a row: by value, or the bytes of a by-reference
/// value (the payload only for varlena types, so that equal values compare
/// equal whatever their header).
#[derive(Clone)]
struct KeyValue {
    byval: Option<pg_sys::Datum>,
    /// Word-aligned copy of the value as a plain datum (4-byte varlena
    /// header for variable-length types).
    words: Vec<u64>,
    len: usize,
}

impl KeyValue {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn datum(&self) -> pg_sys::Datum {
        match self.byval {
            Some(datum) => datum,
            None => pg_sys::Datum::from(self.words.as_ptr()),
        }
    }
}

/// A key value with its type, to bind as a query parameter; it owns its
/// bytes, so it outlives the export (and the transaction) it came from.
#[derive(Clone)]
pub struct KeyParam {
    value: KeyValue,
    type_oid: pg_sys::Oid,
}

impl KeyParam {
    pub fn arg(&self) -> pgrx::datum::DatumWithOid<'_> {
        // SAFETY: `value` is a valid, non-NULL value of `type_oid`, and
        // lives as long as the borrow the argument keeps.
        unsafe { pgrx::datum::DatumWithOid::new(self.value.datum(), self.type_oid) }
    }
}

/// The key column and what it takes to walk it.
struct Key {
    column: String,
    index: usize,
    type_oid: pg_sys::Oid,
    typlen: i16,
    byval: bool,
    /// The column's collation: the one `ORDER BY` and `>` use.
    collation: pg_sys::Oid,
    /// The type's equality function (the type cache's, valid for the
    /// backend's life), so that the checked walk compares values as
    /// `ORDER BY` does (`1.0 = 1.00`, case-insensitive collations).
    equality: *mut pg_sys::FmgrInfo,
    /// A unique index and NOT NULL vouch for the key on every row the
    /// source returns; otherwise (views, queries, inheritance parents)
    /// uniqueness and non-nullness are checked as rows are read.
    verified: bool,
}

impl Key {
    /// Copy `datum` (a non-NULL value of the key type).
    ///
    /// # Safety
    /// `datum` must be a valid value of the key's type.
    unsafe fn copy(&self, datum: pg_sys::Datum) -> KeyValue {
        if self.byval {
            return KeyValue {
                byval: Some(datum),
                words: Vec::new(),
                len: 0,
            };
        }
        // SAFETY: by-reference value of a known length class.
        unsafe {
            let (header, payload): (Option<u32>, &[u8]) = if self.typlen == -1 {
                let plain = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                let payload = pgrx::varlena::varlena_to_byte_slice(plain);
                (Some(((payload.len() + 4) as u32) << 2), payload)
            } else if self.typlen == -2 {
                (
                    None,
                    CStr::from_ptr(datum.cast_mut_ptr()).to_bytes_with_nul(),
                )
            } else {
                (
                    None,
                    std::slice::from_raw_parts(datum.cast_mut_ptr::<u8>(), self.typlen as usize),
                )
            };
            let len = payload.len() + if header.is_some() { 4 } else { 0 };
            let mut words = vec![0u64; len.div_ceil(8).max(1)];
            let bytes = std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len);
            match header {
                Some(h) => {
                    bytes[..4].copy_from_slice(&h.to_ne_bytes());
                    bytes[4..].copy_from_slice(payload);
                }
                None => bytes.copy_from_slice(payload),
            }
            KeyValue {
                byval: None,
                words,
                len,
            }
        }
    }

    /// Whether `datum` equals `value` by the type's equality operator
    /// under the key's collation (byte equality for a type without one).
    ///
    /// # Safety
    /// As for [`Key::copy`].
    unsafe fn equals(&self, datum: pg_sys::Datum, value: &KeyValue) -> bool {
        if !self.equality.is_null() {
            // SAFETY: the type cache's equality function of the key type,
            // called on two non-NULL values of that type.
            return unsafe {
                pg_sys::FunctionCall2Coll(self.equality, self.collation, datum, value.datum())
            }
            .value()
                != 0;
        }
        // SAFETY: forwarded.
        let other = unsafe { self.copy(datum) };
        match (other.byval, value.byval) {
            (Some(a), Some(b)) => a == b,
            _ => other.bytes() == value.bytes(),
        }
    }

    /// The order of two key values (`<0`, `0`, `>0`), by the type's btree
    /// comparison under the key's collation, as `ORDER BY` orders them.
    fn compare(&self, a: &KeyValue, b: &KeyValue) -> i32 {
        // SAFETY: the type cache entry lives for the backend's life; its
        // comparison function is called on two non-NULL values of the key
        // type. A type without one cannot be a key (ORDER BY needs it).
        unsafe {
            let entry =
                pg_sys::lookup_type_cache(self.type_oid, pg_sys::TYPECACHE_CMP_PROC_FINFO as i32);
            if entry.is_null() || (*entry).cmp_proc_finfo.fn_oid == pg_sys::InvalidOid {
                invalid(
                    format!("key type {} has no ordering", type_name(self.type_oid)),
                    Some(KEY_HINT),
                );
            }
            let finfo = std::ptr::addr_of_mut!((*entry).cmp_proc_finfo);
            pg_sys::FunctionCall2Coll(finfo, self.collation, a.datum(), b.datum()).value() as i32
        }
    }

    /// Text form of a key value for a resume token: the type's output
    /// function under fixed settings, so that it reads back exactly in any
    /// session (see [`crate::gucs::with_key_text_settings`]).
    fn token_text(&self, value: &KeyValue) -> String {
        // SAFETY: the value is a valid datum of the key type.
        crate::gucs::with_key_text_settings(|| unsafe {
            let mut output = pg_sys::InvalidOid;
            let mut is_varlena = false;
            pg_sys::getTypeOutputInfo(self.type_oid, &mut output, &mut is_varlena);
            let text = pg_sys::OidOutputFunctionCall(output, value.datum());
            CStr::from_ptr(text).to_string_lossy().into_owned()
        })
    }

    /// Read a token's key text (see [`Key::token_text`]).
    fn parse_token_text(&self, text: &str) -> KeyValue {
        crate::gucs::with_key_text_settings(|| self.parse(text))
    }

    /// Whether the key type's text form is the same under every setting,
    /// so that a version 1 token (text in the exporting session's
    /// settings) can still be read exactly.
    fn text_is_setting_independent(&self) -> bool {
        use pg_sys::BuiltinOid as B;
        [
            B::INT2OID,
            B::INT4OID,
            B::INT8OID,
            B::NUMERICOID,
            B::TEXTOID,
            B::VARCHAROID,
            B::BPCHAROID,
            B::NAMEOID,
            B::UUIDOID,
            B::OIDOID,
            B::BOOLOID,
        ]
        .iter()
        .any(|b| b.value() == self.type_oid)
    }

    /// Parse `text` as a value of the key type (its input function, under
    /// the session's settings); a bad value raises the type's own error.
    fn parse(&self, text: &str) -> KeyValue {
        let Ok(c_text) = std::ffi::CString::new(text) else {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "key value must not contain NUL",
                None,
            )
        };
        // SAFETY: input function of the key type on a NUL-terminated string;
        // the result is copied into Rust memory right away.
        unsafe {
            let mut input = pg_sys::InvalidOid;
            let mut ioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(self.type_oid, &mut input, &mut ioparam);
            let datum =
                pg_sys::OidInputFunctionCall(input, c_text.as_ptr().cast_mut(), ioparam, -1);
            self.copy(datum)
        }
    }
}

struct Keyset {
    key: Key,
    fingerprint: u64,
    from: Option<KeyValue>,
    to: Option<KeyValue>,
    /// The last key exported (or the resume token's), `None` at the start.
    last: Option<KeyValue>,
    /// An incremental job's run (see [`Export::read_job_window`]): the
    /// job's position, when the walk starts below it at the floor.
    position: Option<KeyValue>,
    /// ... and the condition a row at or below the position must meet.
    late_condition: Option<String>,
    /// The last key to read (inclusive), if any.
    through: Option<KeyValue>,
    /// The value bound into the open batch's query; kept unchanged while
    /// that portal is open, since the executor reads it in place.
    bound: Option<KeyValue>,
    cursor: Option<Cursor>,
    row_cxt: pg_sys::MemoryContext,
    batch_limit: u64,
    batch_rows: u64,
    exhausted: bool,
}

impl Keyset {
    /// The token (in the current format) that resumes after `last`, or
    /// from the start when `None`, with `rows` exported before it.
    fn token_after(&self, last: Option<&KeyValue>, rows: u64) -> String {
        ResumeToken {
            fingerprint: self.fingerprint,
            key_column: self.key.column.clone(),
            last_key: last.map(|v| self.key.token_text(v)),
            rows,
            version: crate::token::TOKEN_VERSION,
        }
        .encode()
    }
}

enum Walk {
    Whole(Cursor),
    Keyset(Box<Keyset>),
}

pub struct Export {
    source: Source,
    options: ExportOptions,
    encoder: RowEncoder,
    walk: Walk,
    /// Record lines produced by this export.
    rows: u64,
    /// Rows before this export, from the resume token.
    rows_before: u64,
    encoded_bytes: u64,
    progress: Progress,
    /// The view, progress NOTICEs and audit line; set by [`Export::track`]
    /// on the paths that really export (not for plans and tokens).
    tracked: Option<Tracked>,
    /// Rows and bytes the tracked job had counted before this export (one
    /// chunk of a chunked export).
    tracked_before: (u64, u64),
}

fn invalid(message: impl Into<String>, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint,
    )
}

const KEY_HINT: &str = "a key must be a column with a unique index or primary key on exactly that column, and NOT NULL";

impl Export {
    /// Resolve the source, validate the key and token, and open the walk.
    pub fn open(source: Source, options: ExportOptions, destination: Destination) -> Export {
        check_utf8_database();
        source.lock_relation();
        // The probe gives the row shape (and is the whole walk without a key).
        // Everything that outlives one call of a set-returning function is
        // created here, in the context current at open.
        let row_cxt = row_context();
        let probe = match (&source, &options.key) {
            (Source::Parsed(query), None) => Cursor::open_parsed(query, row_cxt),
            (_, None) => Cursor::open(&source.select_all_sql(), &[], row_cxt),
            (_, Some(_)) => Cursor::open(
                &format!("{} LIMIT 0", source.select_all_sql()),
                &[],
                row_cxt,
            ),
        };
        // SAFETY: the descriptor is valid while the probe is open; the plan
        // copies what it needs and its caches live in the current (per-call
        // or per-function) memory context, which outlives the export.
        let encoder = unsafe {
            RowEncoder::new(probe.tupdesc(), pg_sys::CurrentMemoryContext, options.style)
        };
        let mut rows_before = 0;
        let walk = match &options.key {
            None => Walk::Whole(probe),
            Some(column) => {
                let key = find_key(&source, probe.tupdesc(), column);
                let mut probe = probe;
                probe.close();
                if !key.verified && options.key_from.is_none() && options.key_to.is_none() {
                    refuse_null_keys(&source, &key, row_cxt);
                }
                let fingerprint = fingerprint(source.canonical(), column);
                let last = match &options.after {
                    None => None,
                    Some(text) => {
                        let former = source
                            .former_canonical()
                            .map(|s| crate::token::fingerprint(s, column));
                        let token = ResumeToken::decode(text)
                            .and_then(|t| {
                                t.check_belongs_to(fingerprint, column)
                                    .or_else(|e| match former {
                                        Some(former) => t.check_belongs_to(former, column),
                                        None => Err(e),
                                    })
                                    .map(|_| t)
                            })
                            .unwrap_or_else(|e| invalid(e.to_string(), Some("pass the resume_token of an earlier export of the same source and key")));
                        if token.version == 1 && !key.text_is_setting_independent() {
                            invalid(
                                format!("invalid resume token: a version 1 token cannot be read exactly for a key of type {}", type_name(key.type_oid)),
                                Some("version 1 tokens (pg_stream_export 0.1) hold the key as text in the exporting session's settings; export again from the start, or from key_from"),
                            );
                        }
                        rows_before = token.rows;
                        token.last_key.map(|k| key.parse_token_text(&k))
                    }
                };
                let from = options.key_from.as_deref().map(|t| key.parse(t));
                let to = options.key_to.as_deref().map(|t| key.parse(t));
                Walk::Keyset(Box::new(Keyset {
                    key,
                    fingerprint,
                    from,
                    to,
                    bound: None,
                    last,
                    position: None,
                    late_condition: None,
                    through: None,
                    cursor: None,
                    row_cxt,
                    batch_limit: 0,
                    batch_rows: 0,
                    exhausted: false,
                }))
            }
        };
        let progress = Progress::start(source.relation_oid(), destination);
        Export {
            source,
            options,
            encoder,
            walk,
            rows: 0,
            rows_before,
            encoded_bytes: 0,
            progress,
            tracked: None,
            tracked_before: (0, 0),
        }
    }

    /// Count this export's rows and bytes in `tracked`, a job that had
    /// counted `before` already; [`Export::release_tracked`] hands it back.
    pub fn count_in(&mut self, tracked: Tracked, before: (u64, u64)) {
        self.tracked = Some(tracked);
        self.tracked_before = before;
    }

    pub fn release_tracked(&mut self) -> Option<Tracked> {
        self.tracked.take()
    }

    /// Show this export in `stream_export_activity`, send progress NOTICEs
    /// and write its audit line; `destination` says where it goes.
    pub fn track(&mut self, destination: &str) {
        let estimated_rows = match &self.walk {
            Walk::Whole(cursor) => cursor.estimated_rows(),
            Walk::Keyset(_) => None,
        }
        .or_else(|| relation_row_estimate(self.source.relation_oid()));
        self.tracked = Some(Tracked::start(Description {
            source: self.source.description(),
            destination: destination.to_string(),
            format: self.options.describe(),
            estimated_rows,
        }));
    }

    /// Bytes written to the destination so far, for the view.
    pub fn note_written(&mut self, bytes: u64) {
        if let Some(tracked) = &mut self.tracked {
            tracked.written(bytes);
        }
    }

    /// The export reached its end and its output is in place.
    pub fn complete(&mut self, written: u64, crc32: Option<u32>) {
        if let Some(tracked) = &mut self.tracked {
            tracked.written(written);
            tracked.complete(crc32);
        }
    }

    pub fn options(&self) -> &ExportOptions {
        &self.options
    }

    fn average_row_bytes(&self) -> Option<usize> {
        (self.rows > 0).then(|| (self.encoded_bytes / self.rows) as usize)
    }

    /// Rows to ask for next: the batch size, but never more than about
    /// one target batch of bytes, so very wide rows do not pile up.
    pub fn next_fetch_rows(&self) -> u64 {
        let batch = self.options.batch_size.rows(self.average_row_bytes()) as u64;
        match self.average_row_bytes() {
            Some(width) => batch.min((BatchSize::TARGET_BYTES / width.max(1)).max(1) as u64),
            // The first fetch measures the row width with a single row.
            None => 1,
        }
    }

    /// Append up to `max_rows` lines to `sink`; 0 means the export is done.
    pub fn fetch(&mut self, max_rows: u64, sink: &mut dyn LineSink) -> u64 {
        let next_limit = self.options.batch_size.rows(self.average_row_bytes()) as u64;
        let rows = match &mut self.walk {
            Walk::Whole(cursor) => {
                let encoder = &mut self.encoder;
                let encoded = &mut self.encoded_bytes;
                let n = cursor.fetch(max_rows as i64, &mut |values, nulls| {
                    // SAFETY: the row matches the descriptor the encoder was
                    // planned for.
                    unsafe { encode_line(encoder, sink, values, nulls, encoded) };
                });
                if n == 0 {
                    cursor.close();
                }
                n
            }
            Walk::Keyset(keyset) => fetch_keyset(
                keyset,
                &self.source,
                &mut self.encoder,
                sink,
                max_rows,
                next_limit,
                &mut self.encoded_bytes,
            ),
        };
        self.rows += rows;
        self.progress.update(self.rows, self.encoded_bytes);
        if let Some(tracked) = &mut self.tracked {
            let (rows_before, bytes_before) = self.tracked_before;
            tracked.update(rows_before + self.rows, bytes_before + self.encoded_bytes);
        }
        rows
    }

    /// The key of the last row exported, in the form resume tokens hold
    /// (independent of session settings); `None` without a key or rows.
    pub fn last_key_text(&self) -> Option<String> {
        let Walk::Keyset(keyset) = &self.walk else {
            return None;
        };
        keyset.last.as_ref().map(|v| keyset.key.token_text(v))
    }

    /// The key of the last row exported as a query parameter of the key's
    /// type (for a statement about exactly the rows exported, such as an
    /// archive's DELETE); `None` without a key or rows.
    pub fn last_key_param(&self) -> Option<KeyParam> {
        let Walk::Keyset(keyset) = &self.walk else {
            return None;
        };
        keyset.last.clone().map(|value| KeyParam {
            value,
            type_oid: keyset.key.type_oid,
        })
    }

    /// The token to resume after the last row, with a key; `None` without.
    /// For a job's run ([`Export::read_job_window`]) it is the job's
    /// position or the last row's key, whichever is greater.
    pub fn resume_token(&self) -> Option<String> {
        let Walk::Keyset(keyset) = &self.walk else {
            return None;
        };
        let last = match (&keyset.position, &keyset.last) {
            (Some(position), Some(last)) if self.rows > 0 => {
                if keyset.key.compare(last, position) > 0 {
                    Some(last)
                } else {
                    Some(position)
                }
            }
            (Some(position), _) => Some(position),
            (None, last) => last.as_ref(),
        };
        Some(keyset.token_after(last, self.rows_before + self.rows))
    }

    /// Make this export (opened with `after` = the job's position P, not
    /// yet fetched) one run of an incremental job: it reads, in key order,
    /// the rows with a key above `floor` (a key in the form tokens hold;
    /// `None`: from the start) that are either above P or were inserted by
    /// a transaction the previous run's `snapshot` did not see (and that is
    /// not `run_xid`, the previous run's own, nor one of `run_subxids`, its
    /// subtransactions'). Without a position (the
    /// job's first part) there is nothing below it to look at again.
    pub fn read_job_window(
        &mut self,
        floor: Option<&str>,
        snapshot: &str,
        run_xid: Option<u64>,
        run_subxids: &[u64],
    ) {
        let Walk::Keyset(keyset) = &mut self.walk else {
            return;
        };
        if keyset.last.is_none() {
            return;
        }
        let condition = late_row_condition(snapshot, run_xid, run_subxids);
        let position = keyset.last.take();
        let mut floor = floor.map(|text| keyset.key.parse_token_text(text));
        // The window never starts above the position (a job's run 0 can
        // have seen a largest key that was deleted before its first run):
        // every key above the position is read.
        if let (Some(f), Some(p)) = (&floor, &position) {
            if keyset.key.compare(f, p) > 0 {
                floor = position.clone();
            }
        }
        keyset.position = position;
        keyset.last = floor;
        keyset.late_condition = Some(condition);
    }

    /// The token after the largest key of the source that the active
    /// snapshot sees (`None`: no row), found as the walk orders keys
    /// (`ORDER BY key DESC LIMIT 1`, one index lookup): an incremental
    /// job's position when it is made (its run 0, see `run::jobs`).
    pub fn largest_key_token(&self) -> Option<String> {
        let Walk::Keyset(keyset) = &self.walk else {
            return None;
        };
        let key = &keyset.key;
        let column = format!("{SOURCE_ALIAS}.{}", quote_identifier(&key.column));
        let sql = format!(
            "SELECT {column} FROM {} AS {SOURCE_ALIAS} WHERE {column} IS NOT NULL \
             ORDER BY {column} DESC LIMIT 1",
            self.source.sql_from_item()
        );
        let mut cursor = Cursor::open(&sql, &[], keyset.row_cxt);
        let mut largest = None;
        cursor.fetch(1, &mut |values, nulls| {
            // SAFETY: a row of the one-column descriptor of the key's type;
            // the value is copied out before the row's memory is reset.
            unsafe {
                if !*nulls {
                    largest = Some(key.copy(*values));
                }
            }
        });
        cursor.close();
        largest.map(|value| keyset.token_after(Some(&value), 0))
    }

    /// Read no row whose key is above `key_text` (a key in the form tokens
    /// hold).
    pub fn read_through(&mut self, key_text: &str) {
        if let Walk::Keyset(keyset) = &mut self.walk {
            keyset.through = Some(keyset.key.parse_token_text(key_text));
        }
    }

    /// The key column and its type as SQL (`format_type_be`), with a key.
    pub fn key_column_and_type(&self) -> Option<(String, String)> {
        let Walk::Keyset(keyset) = &self.walk else {
            return None;
        };
        Some((keyset.key.column.clone(), type_name(keyset.key.type_oid)))
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The token that resumes after a row whose key has the JSON text form
    /// `key_text` (for a client whose stream broke); it cannot know how
    /// many rows came before, so it says 0. JSON renders dates and times
    /// in ISO 8601 with numeric offsets, which read back the same under
    /// the fixed settings.
    pub fn token_after_key_text(&self, key_text: &str) -> String {
        let Walk::Keyset(keyset) = &self.walk else {
            invalid("a resume token needs a key", None)
        };
        let type_oid = keyset.key.type_oid;
        if type_oid == pg_sys::BuiltinOid::FLOAT4OID.value()
            || type_oid == pg_sys::BuiltinOid::FLOAT8OID.value()
        {
            invalid(
                format!(
                    "a resume token cannot be made from a line for a key of type {}",
                    type_name(type_oid)
                ),
                Some("a float in an NDJSON line may be rounded (extra_float_digits), so the row it names is not certain; use the footer's resume_token, or a key of an exact type"),
            );
        }
        let value = keyset.key.parse_token_text(key_text);
        keyset.token_after(Some(&value), 0)
    }

    /// Finish `writer`: flush the records, append the footer when asked.
    pub fn finish_writer<W: std::io::Write>(
        &self,
        writer: &mut ExportWriter<W>,
    ) -> std::io::Result<()> {
        let make_footer = |stats: &RecordStats| self.footer(stats);
        let footer: Option<&dyn Fn(&RecordStats) -> Footer> =
            self.options.footer.then_some(&make_footer);
        writer.finish(footer)
    }

    pub fn footer(&self, stats: &RecordStats) -> Footer {
        stats.footer(self.resume_token())
    }
}

/// pg_class's row estimate of a relation, when it has one (never analysed
/// or vacuumed: none).
pub fn relation_row_estimate(relation: pg_sys::Oid) -> Option<i64> {
    if relation == pg_sys::InvalidOid {
        return None;
    }
    let estimate: Option<i64> = crate::engine::scan::select_one(
        "SELECT reltuples::int8 FROM pg_catalog.pg_class WHERE oid = $1",
        &[relation.into()],
    );
    estimate.filter(|&rows| rows >= 0)
}

/// NDJSON is UTF-8, and text is copied out as stored: a database in another
/// encoding is refused rather than exported as invalid UTF-8.
fn check_utf8_database() {
    // SAFETY: reads the database encoding, fixed for the session.
    let (encoding, name) = unsafe {
        (
            pg_sys::GetDatabaseEncoding(),
            CStr::from_ptr(pg_sys::GetDatabaseEncodingName())
                .to_string_lossy()
                .into_owned(),
        )
    };
    if encoding != pg_sys::pg_enc::PG_UTF8 as i32 {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("pg_stream_export needs a UTF8 database; this one is {name}"),
            Some("export from a database created with ENCODING 'UTF8', or convert the data first"),
        );
    }
}

/// # Safety
/// `values`/`nulls` must be a row of the encoder's descriptor.
unsafe fn encode_line(
    encoder: &mut RowEncoder,
    sink: &mut dyn LineSink,
    values: *const pg_sys::Datum,
    nulls: *const bool,
    encoded: &mut u64,
) {
    let buffer = sink.buffer();
    let start = buffer.len();
    // SAFETY: forwarded from the caller.
    unsafe { encoder.encode_values(buffer, values, nulls) };
    buffer.push(b'\n');
    *encoded += (buffer.len() - start) as u64;
    sink.line_done(start);
}

fn fetch_keyset(
    keyset: &mut Keyset,
    source: &Source,
    encoder: &mut RowEncoder,
    sink: &mut dyn LineSink,
    max_rows: u64,
    next_limit: u64,
    encoded: &mut u64,
) -> u64 {
    let mut produced = 0;
    while produced < max_rows && !keyset.exhausted {
        if keyset.cursor.is_none() {
            open_batch(keyset, source, next_limit);
        }
        let want = (max_rows - produced).min(keyset.batch_limit - keyset.batch_rows);
        let mut exported = 0u64;
        let cursor = keyset.cursor.as_mut().expect("a batch cursor is open");
        let key = &keyset.key;
        let (last, bound) = (&mut keyset.last, &keyset.bound);
        let mut first_of_batch = keyset.batch_rows == 0;
        let fetched = cursor.fetch(want as i64, &mut |values, nulls| {
            // SAFETY: the row has the source's descriptor; the key index is
            // one of its attributes.
            unsafe {
                if *nulls.add(key.index) {
                    invalid(
                        format!("key column \"{}\" is NULL in a row", key.column),
                        Some(KEY_HINT),
                    );
                }
                let datum = *values.add(key.index);
                let is_first = std::mem::replace(&mut first_of_batch, false);
                if !key.verified {
                    // Batches after the first start at >= the bound: the
                    // row equal to it was exported already.
                    if is_first && bound.as_ref().is_some_and(|b| key.equals(datum, b)) {
                        return;
                    }
                    if last.as_ref().is_some_and(|l| key.equals(datum, l)) {
                        invalid(
                            format!(
                                "key column \"{}\" is not unique: a value appears twice",
                                key.column
                            ),
                            Some(KEY_HINT),
                        );
                    }
                }
                *last = Some(key.copy(datum));
                encode_line(encoder, sink, values, nulls, encoded);
                exported += 1;
            }
        });
        keyset.batch_rows += fetched;
        produced += exported;
        if fetched < want {
            // This batch's query is done: fewer rows than its LIMIT means
            // the source is done too.
            keyset.exhausted = keyset.batch_rows < keyset.batch_limit;
            close_batch(keyset);
        } else if keyset.batch_rows >= keyset.batch_limit {
            close_batch(keyset);
        }
    }
    produced
}

fn close_batch(keyset: &mut Keyset) {
    if let Some(mut cursor) = keyset.cursor.take() {
        cursor.close();
    }
}

fn open_batch(keyset: &mut Keyset, source: &Source, limit: u64) {
    let key = &keyset.key;
    let column = format!("{SOURCE_ALIAS}.{}", quote_identifier(&key.column));
    let mut conditions = Vec::new();
    let mut params: Vec<(pg_sys::Oid, Option<pg_sys::Datum>)> = Vec::new();
    keyset.bound = keyset.last.clone();
    // Without a vouching index, re-read the bound row (and skip it) so
    // that a duplicate straddling two batches is noticed.
    let extra = u64::from(!key.verified && keyset.bound.is_some());
    if let Some(bound) = &keyset.bound {
        params.push((key.type_oid, Some(bound.datum())));
        let op = if key.verified { ">" } else { ">=" };
        conditions.push(format!("{column} {op} ${}", params.len()));
    }
    if let Some(from) = &keyset.from {
        params.push((key.type_oid, Some(from.datum())));
        conditions.push(format!("{column} >= ${}", params.len()));
    }
    if let Some(to) = &keyset.to {
        params.push((key.type_oid, Some(to.datum())));
        conditions.push(format!("{column} < ${}", params.len()));
    }
    if let Some(through) = &keyset.through {
        params.push((key.type_oid, Some(through.datum())));
        conditions.push(format!("{column} <= ${}", params.len()));
    }
    if let (Some(position), Some(late)) = (&keyset.position, &keyset.late_condition) {
        params.push((key.type_oid, Some(position.datum())));
        conditions.push(format!("({column} > ${} OR {late})", params.len()));
    }
    keyset.batch_limit = limit + extra;
    keyset.batch_rows = 0;
    params.push((
        pg_sys::BuiltinOid::INT8OID.value(),
        Some(pg_sys::Datum::from(keyset.batch_limit as i64)),
    ));
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT * FROM {} AS {SOURCE_ALIAS}{where_clause} ORDER BY {column} LIMIT ${}",
        source.sql_from_item(),
        params.len()
    );
    keyset.cursor = Some(Cursor::open(&sql, &params, keyset.row_cxt));
}

/// A snapshot as `pg_current_snapshot()::text` writes it
/// (`xmin:xmax:xip,...`), checked to be only that.
struct SnapshotText {
    xmax: u64,
}

/// The xmax of a snapshot as `pg_current_snapshot()::text` writes it.
pub fn snapshot_xmax(text: &str) -> Option<u64> {
    parse_snapshot(text).map(|s| s.xmax)
}

fn parse_snapshot(text: &str) -> Option<SnapshotText> {
    let mut fields = text.split(':');
    let xmin: u64 = fields.next()?.parse().ok()?;
    let xmax: u64 = fields.next()?.parse().ok()?;
    let xip = fields.next()?;
    if fields.next().is_some() || xmin > xmax || xmax > i64::MAX as u64 {
        return None;
    }
    if !xip.is_empty() && !xip.split(',').all(|x| x.parse::<u64>().is_ok()) {
        return None;
    }
    Some(SnapshotText { xmax })
}

/// SQL true of a row of the source whose inserting transaction (`xmin`)
/// the snapshot `snapshot` did not see, other than `run_xid` and
/// `run_subxids` (written as ranges of consecutive ids). The 32-bit
/// xmin is widened to a full transaction id relative to the snapshot's
/// xmax (the signed 32-bit difference added to it); the special ids below
/// 3 (bootstrap, frozen) and the ids of frozen rows count as seen.
fn late_row_condition(snapshot: &str, run_xid: Option<u64>, run_subxids: &[u64]) -> String {
    let Some(parsed) = parse_snapshot(snapshot) else {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("the job's recorded snapshot is not a snapshot: \"{snapshot}\""),
            Some("the job's catalog row was changed outside pg_stream_export's functions"),
        )
    };
    let low = parsed.xmax % (1 << 32);
    let xmin = format!("{SOURCE_ALIAS}.xmin::text::int8");
    let widened = format!(
        "({} + ((({xmin} - {low}) + 6442450944) % 4294967296 - 2147483648))",
        parsed.xmax
    );
    let mut own = run_xid
        .map(|xid| format!(" OR {widened} = {xid}"))
        .unwrap_or_default();
    for (first, last) in consecutive_runs(run_subxids) {
        own += &if first == last {
            format!(" OR {widened} = {first}")
        } else {
            format!(" OR {widened} BETWEEN {first} AND {last}")
        };
    }
    // A frozen row keeps its raw xmin, which may be more than 2^31 ids
    // behind now and then widens to an id after the snapshot: a row whose
    // xmin precedes its relation's relfrozenxid, or lies after now, is
    // frozen (asked only of the rows the snapshot did not see).
    let age = format!("pg_catalog.age({SOURCE_ALIAS}.xmin)");
    let frozen = format!(
        "{age} < 0 OR {age} > pg_catalog.age((SELECT c.relfrozenxid FROM pg_catalog.pg_class c \
         WHERE c.oid = {SOURCE_ALIAS}.tableoid))"
    );
    format!(
        "NOT ({xmin} < 3{own} OR pg_catalog.pg_visible_in_snapshot({widened}::text::pg_catalog.xid8, '{snapshot}'::pg_catalog.pg_snapshot) OR {frozen})"
    )
}

/// `ids` as runs of consecutive ids, `(first, last)`, in order.
fn consecutive_runs(ids: &[u64]) -> Vec<(u64, u64)> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// The checked walk sees NULL keys only in its first batch (`key > $1`
/// is never true for NULL), so look for one before anything is exported.
/// A NOT NULL column (inherited by every child table) needs no look.
fn refuse_null_keys(source: &Source, key: &Key, row_cxt: pg_sys::MemoryContext) {
    let column = quote_identifier(&key.column);
    let not_null = source.relation_oid() != pg_sys::InvalidOid
        && crate::engine::scan::select_one::<bool>(
            "SELECT attnotnull FROM pg_catalog.pg_attribute
             WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            &[source.relation_oid().into(), key.column.as_str().into()],
        )
        .unwrap_or(false);
    if not_null {
        return;
    }
    let mut probe = Cursor::open(
        &format!(
            "SELECT 1 FROM {} AS {SOURCE_ALIAS} WHERE {SOURCE_ALIAS}.{column} IS NULL LIMIT 1",
            source.sql_from_item()
        ),
        &[],
        row_cxt,
    );
    let nulls = probe.fetch(1, &mut |_, _| {});
    probe.close();
    if nulls > 0 {
        invalid(
            format!("key column \"{}\" is NULL in a row", key.column),
            Some(KEY_HINT),
        );
    }
}

/// Find the key column in the source's row shape and check that it can
/// serve as a key.
fn find_key(source: &Source, tupdesc: pg_sys::TupleDesc, column: &str) -> Key {
    // SAFETY: a valid descriptor from an open cursor; attributes within natts.
    let found = unsafe {
        crate::compat::attributes(tupdesc)
            .iter()
            .enumerate()
            .find(|(_, a)| {
                !a.attisdropped
                    && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == column.as_bytes()
            })
            .map(|(i, a)| (i, a.atttypid, a.attlen, a.attbyval, a.attcollation))
    };
    let Some((index, type_oid, typlen, byval, collation)) = found else {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" does not exist in the export source"),
            Some("key names a column of the source exactly, case included"),
        )
    };
    let verified = match source {
        Source::Relation {
            oid,
            indexable: true,
            ..
        } => {
            if !has_unique_not_null_index(*oid, column) {
                invalid(
                    format!("key column \"{column}\" is not unique and not null"),
                    Some(KEY_HINT),
                );
            }
            // A unique index covers its own table only: the rows of
            // inheritance children (which the source reads too) are
            // checked as they are read. A partitioned table's unique
            // index covers every partition.
            !has_inheritance_children(*oid)
        }
        _ => false,
    };
    // SAFETY: the type cache entry lives for the backend's life; its
    // equality FmgrInfo is set up by the lookup when the type has one.
    let equality = unsafe {
        let entry = pg_sys::lookup_type_cache(type_oid, pg_sys::TYPECACHE_EQ_OPR_FINFO as i32);
        if entry.is_null() || (*entry).eq_opr_finfo.fn_oid == pg_sys::InvalidOid {
            std::ptr::null_mut()
        } else {
            std::ptr::addr_of_mut!((*entry).eq_opr_finfo)
        }
    };
    Key {
        column: column.to_owned(),
        index,
        type_oid,
        typlen,
        byval,
        collation,
        equality,
        verified,
    }
}

/// Whether a plain or materialized table has inheritance children (a
/// partitioned table's partitions are covered by its own unique index).
fn has_inheritance_children(relation: pg_sys::Oid) -> bool {
    crate::engine::scan::select_one::<bool>(
        "SELECT c.relkind <> 'p' AND EXISTS (
             SELECT 1 FROM pg_catalog.pg_inherits WHERE inhparent = c.oid)
         FROM pg_catalog.pg_class c WHERE c.oid = $1",
        &[relation.into()],
    )
    .unwrap_or(false)
}

/// The SQL name of a type (`format_type_be`).
fn type_name(type_oid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be returns a palloc'd name for any type OID.
    unsafe { CStr::from_ptr(pg_sys::format_type_be(type_oid)) }
        .to_string_lossy()
        .into_owned()
}

fn has_unique_not_null_index(relation: pg_sys::Oid, column: &str) -> bool {
    let found: Option<bool> = crate::engine::scan::select_one(
        "SELECT a.attnotnull AND EXISTS (
             SELECT 1 FROM pg_catalog.pg_index i
             WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
               AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indexprs IS NULL)
         FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[relation.into(), column.into()],
    );
    found.unwrap_or(false)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn ids_become_runs_of_consecutive_ids() {
        assert_eq!(consecutive_runs(&[]), vec![]);
        assert_eq!(consecutive_runs(&[7]), vec![(7, 7)]);
        assert_eq!(
            consecutive_runs(&[12, 10, 11, 11, 20, 14, 15]),
            vec![(10, 12), (14, 15), (20, 20)]
        );
    }

    #[test]
    fn a_snapshots_xmax_is_read_from_its_text() {
        assert_eq!(snapshot_xmax("729:736:729,731"), Some(736));
        assert_eq!(snapshot_xmax("728:728:"), Some(728));
        assert_eq!(snapshot_xmax("9:8:"), None);
        assert_eq!(snapshot_xmax("1:2:x"), None);
    }
}
