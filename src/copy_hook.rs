//! COPY integration: `COPY ... TO STDOUT | 'file' WITH (FORMAT ndjson, ...)`.
//!
//! A ProcessUtility hook takes COPY TO statements whose FORMAT is ndjson and
//! runs them through the same export pipeline as the functions (so the
//! bytes equal `stream_export_bytes` with the same options); every other
//! statement goes to the previous hook, or to PostgreSQL, untouched.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::{is_a, pg_guard, pg_sys, PgList, PgSqlErrorCode};

use crate::error::raise;
use crate::export::{write_whole_export, Export};
use crate::file::{check_write_privilege, raise_io, resolve_target, PartialFile};
use crate::ident::{copy_query_text, quote_identifier};
use crate::options::{Compression, ExportOptions, RawOptions};
use crate::progress::Destination;
use crate::sink::background::BackgroundWriter;
use crate::sink::ExportWriter;
use crate::source::{qualified_relation_name, Source};

static INSTALLED: AtomicBool = AtomicBool::new(false);
static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Install the hook once per backend, chaining whatever was there before.
pub fn install() {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: backend-local globals, set once during library load on the
    // backend's only thread.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid planned utility statement; the
    // CopyStmt is only read.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if !node.is_null() && is_a(node, pg_sys::NodeTag::T_CopyStmt) {
            let copy = node.cast::<pg_sys::CopyStmt>();
            if let Some(options) = ndjson_options(copy) {
                run_copy(pstmt, query_string, copy, options, qc);
                return;
            }
        }
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}

/// COPY options of an ndjson COPY, validated.
struct CopyOptions {
    compression: Compression,
    compression_level: Option<i32>,
    footer: bool,
}

fn option_name(def: *mut pg_sys::DefElem) -> String {
    // SAFETY: every DefElem of a CopyStmt has a name.
    unsafe {
        CStr::from_ptr((*def).defname)
            .to_string_lossy()
            .to_ascii_lowercase()
    }
}

fn option_string(def: *mut pg_sys::DefElem) -> String {
    // SAFETY: defGetString raises a proper error when there is no value.
    unsafe {
        CStr::from_ptr(pg_sys::defGetString(def))
            .to_string_lossy()
            .into_owned()
    }
}

/// `None` when the COPY is not FORMAT ndjson (PostgreSQL handles it);
/// otherwise the options, or an error for one that does not fit.
unsafe fn ndjson_options(copy: *mut pg_sys::CopyStmt) -> Option<CopyOptions> {
    // SAFETY: the options list holds DefElem nodes.
    let defs: Vec<*mut pg_sys::DefElem> = unsafe {
        PgList::<pg_sys::DefElem>::from_pg((*copy).options)
            .iter_ptr()
            .collect()
    };
    let is_ndjson = defs
        .iter()
        .any(|&d| option_name(d) == "format" && option_string(d).eq_ignore_ascii_case("ndjson"));
    if !is_ndjson {
        return None;
    }
    // SAFETY: plain field reads of the statement.
    let (is_from, is_program) = unsafe { ((*copy).is_from, (*copy).is_program) };
    if is_from {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "COPY FROM with FORMAT ndjson is not supported",
            Some("FORMAT ndjson is an export format: use it with COPY ... TO"),
        );
    }
    if is_program {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "COPY TO PROGRAM with FORMAT ndjson is not supported",
            Some("use COPY ... TO STDOUT and a pipe, or COMPRESSION gzip"),
        );
    }
    let mut options = CopyOptions {
        compression: Compression::None,
        compression_level: None,
        footer: false,
    };
    for &def in &defs {
        let name = option_name(def);
        match name.as_str() {
            "format" => {}
            "compression" => {
                options.compression = option_string(def).parse().unwrap_or_else(|e: crate::options::OptionError| {
                    raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.message, Some(&e.hint))
                })
            }
            // SAFETY: defGetInt32 / defGetBoolean raise on bad values.
            "compression_level" => options.compression_level = Some(unsafe { pg_sys::defGetInt32(def) }),
            "footer" => options.footer = unsafe { pg_sys::defGetBoolean(def) },
            "encoding" => {
                let encoding = option_string(def).replace(['-', '_'], "").to_ascii_lowercase();
                if encoding != "utf8" {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("COPY option \"encoding\" must be UTF8 with FORMAT ndjson, not \"{}\"", option_string(def)),
                        Some("NDJSON output is always UTF-8"),
                    );
                }
            }
            "header" | "delimiter" | "null" | "quote" | "escape" | "force_quote" | "force_not_null"
            | "force_null" | "freeze" | "default" => raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("COPY option \"{name}\" cannot be used with FORMAT ndjson"),
                Some("FORMAT ndjson takes COMPRESSION, COMPRESSION_LEVEL, FOOTER and ENCODING 'UTF8'"),
            ),
            _ => raise(
                PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
                format!("COPY option \"{name}\" not recognized with FORMAT ndjson"),
                Some("FORMAT ndjson takes COMPRESSION, COMPRESSION_LEVEL, FOOTER and ENCODING 'UTF8'"),
            ),
        }
    }
    Some(options)
}

/// The source of the COPY: a relation (with its column list) or a query.
unsafe fn copy_source(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    copy: *mut pg_sys::CopyStmt,
) -> Source {
    // SAFETY: reads of the statement and catalog lookups in a transaction.
    unsafe {
        if !(*copy).relation.is_null() {
            let relation = pg_sys::RangeVarGetRelidExtended(
                (*copy).relation,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
                0,
                None,
                std::ptr::null_mut(),
            );
            let Some(name) = qualified_relation_name(relation) else {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    "the COPY relation is gone",
                    None,
                )
            };
            let columns: Vec<String> = PgList::<pg_sys::Node>::from_pg((*copy).attlist)
                .iter_ptr()
                .map(|node| {
                    quote_identifier(
                        &CStr::from_ptr((*node.cast::<pg_sys::String>()).sval).to_string_lossy(),
                    )
                })
                .collect();
            let list = if columns.is_empty() {
                "*".to_string()
            } else {
                columns.join(", ")
            };
            // Like COPY, a plain table's own rows only; a partitioned table's
            // rows are in its partitions.
            let only = if pg_sys::get_rel_relkind(relation) as u8 == b'p' {
                ""
            } else {
                "ONLY "
            };
            return Source::Select {
                relation,
                sql: format!("SELECT {list} FROM {only}{name}"),
            };
        }
        let text = CStr::from_ptr(query_string).to_string_lossy();
        let start = (*pstmt).stmt_location.max(0) as usize;
        let len = (*pstmt).stmt_len;
        let end = if len > 0 {
            (start + len as usize).min(text.len())
        } else {
            text.len()
        };
        let statement = text.get(start..end).unwrap_or(&text);
        match copy_query_text(statement) {
            Some(query) => Source::checked_query(query),
            None => raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "could not find the query of this COPY statement",
                Some("write it as COPY (SELECT ...) TO ..."),
            ),
        }
    }
}

/// Sends CopyData messages to the client.
struct CopyOut;

impl std::io::Write for CopyOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        send_message(b'd', data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn send_message(kind: u8, data: &[u8]) {
    // SAFETY: builds one protocol message in a StringInfo and hands it to
    // libpq's send buffer (which blocks when the client is slow).
    unsafe {
        let mut buffer = pg_sys::StringInfoData::default();
        pg_sys::pq_beginmessage(&mut buffer, kind as std::ffi::c_char);
        if !data.is_empty() {
            pg_sys::pq_sendbytes(&mut buffer, data.as_ptr().cast(), data.len() as i32);
        }
        pg_sys::pq_endmessage(&mut buffer);
    }
}

unsafe fn run_copy(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    copy: *mut pg_sys::CopyStmt,
    copy_options: CopyOptions,
    qc: *mut pg_sys::QueryCompletion,
) {
    let options = ExportOptions::parse(&RawOptions {
        compression: Some(if copy_options.compression == Compression::Gzip {
            "gzip"
        } else {
            "none"
        }),
        compression_level: copy_options.compression_level,
        footer: Some(copy_options.footer),
        ..Default::default()
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            e.message,
            Some(&e.hint),
        )
    });
    // SAFETY: plain reads of the statement.
    let filename = unsafe { (*copy).filename };
    let rows = if filename.is_null() {
        // SAFETY: reads the backend's output mode.
        if unsafe { pg_sys::whereToSendOutput } != pg_sys::CommandDest::DestRemote {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "COPY TO STDOUT with FORMAT ndjson needs a client connection",
                None,
            );
        }
        // SAFETY: as above.
        let source = unsafe { copy_source(pstmt, query_string, copy) };
        let (compression, level) = (options.compression, options.compression_level);
        let mut export = Export::open(source, options, Destination::Pipe);
        // CopyOutResponse: overall format (1 = binary for gzip bytes), one column.
        let format = u8::from(compression == Compression::Gzip);
        send_message(b'H', &[format, 0, 1, 0, format]);
        let mut writer = ExportWriter::new(CopyOut, compression, level);
        let rows = write_whole_export(&mut export, &mut writer);
        send_message(b'c', &[]);
        rows
    } else {
        check_write_privilege();
        // SAFETY: the file name is a C string of the statement.
        let path = unsafe { CStr::from_ptr(filename) }
            .to_string_lossy()
            .into_owned();
        let target = resolve_target(&path);
        // SAFETY: as above.
        let source = unsafe { copy_source(pstmt, query_string, copy) };
        // COPY TO 'file' replaces an existing file; atomically here.
        let mut partial = PartialFile::create(target, true);
        let (compression, level) = (options.compression, options.compression_level);
        let mut export = Export::open(source, options, Destination::File);
        let file = partial
            .take_file()
            .unwrap_or_else(|e| raise_io(e, "COPY output"));
        let mut writer = ExportWriter::new(BackgroundWriter::new(file), compression, level);
        let rows = write_whole_export(&mut export, &mut writer);
        let file = writer
            .into_output()
            .finish()
            .unwrap_or_else(|e| raise_io(e, "COPY output"));
        partial
            .commit(file)
            .unwrap_or_else(|e| raise_io(e, "COPY output"));
        rows
    };
    if !qc.is_null() {
        // SAFETY: PostgreSQL's completion record for this statement.
        unsafe {
            (*qc).commandTag = pg_sys::CommandTag::CMDTAG_COPY;
            (*qc).nprocessed = rows;
        }
    }
}
