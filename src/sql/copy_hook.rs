//! COPY integration: `COPY ... TO STDOUT | 'file' WITH (FORMAT ndjson, ...)`,
//! and PostgreSQL 19's spelling `(FORMAT json [, FORCE_ARRAY])`.
//!
//! A ProcessUtility hook takes COPY TO statements whose FORMAT is ndjson or
//! json and runs them through the same export pipeline as the functions (so
//! the bytes equal `stream_export_bytes` with the same options). On a
//! server with native `FORMAT json` (see `compat::NATIVE_COPY_JSON`), plain
//! json statements are left to it. The query and
//! the options come from the parsed `CopyStmt`, never from the statement's
//! text. Every other statement goes to the previous hook, or to PostgreSQL,
//! from a frame that holds nothing and catches nothing, so that its errors
//! reach the client exactly as they would without the extension.
//!
//! The same hook keeps incremental jobs' owners real where it is loaded:
//! `DROP ROLE` of a role that owns jobs in this database is refused naming
//! them, `DROP OWNED BY` removes its jobs and `REASSIGN OWNED BY` gives them
//! to the new role (see [`crate::run::jobs::refuse_dropping_owners`]). The
//! owners' pins (policies, and an event trigger, in `jobs.rs`'s SQL) hold
//! the first two without the library and from other databases.

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::{is_a, pg_guard, pg_sys, PgList, PgSqlErrorCode};

use crate::destination::client::CopyOut;
use crate::engine::source::{qualified_relation_name, ParsedQuery, Source};
use crate::error::raise;
use crate::ident::quote_identifier;
use crate::options::{Compression, ExportOptions, RawOptions};
use crate::progress::Destination;
use crate::run;

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

extern "C-unwind" {
    /// PostgreSQL's own function, declared here without pgrx's error
    /// conversion: an error it raises must travel through the hook as a
    /// plain PostgreSQL error, untouched.
    #[link_name = "standard_ProcessUtility"]
    fn postgres_standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// The hook. It holds no value that needs dropping and catches nothing:
/// a statement that is not ours is passed on as if the hook were not
/// there (its errors unwind through this frame as PostgreSQL errors).
///
/// # Safety
///
/// Only as `ProcessUtility_hook`, with PostgreSQL's arguments for the statement
/// being run.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid planned utility statement; the
    // check only reads it and cannot raise.
    unsafe {
        if is_our_copy(pstmt) {
            run_ndjson_copy(pstmt, query_string, qc);
            return;
        }
        let role_statement = is_role_statement(pstmt);
        if role_statement {
            before_role_statement(pstmt);
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
            None => postgres_standard_process_utility(
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
        if role_statement {
            after_role_statement(pstmt);
        }
    }
}

/// The utility statement of `pstmt`, if it is a DROP ROLE, DROP OWNED or
/// REASSIGN OWNED statement. Cannot raise.
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt.
unsafe fn is_role_statement(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: forwarded; only node tags are read.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        !stmt.is_null()
            && (is_a(stmt, pg_sys::NodeTag::T_DropRoleStmt)
                || is_a(stmt, pg_sys::NodeTag::T_DropOwnedStmt)
                || is_a(stmt, pg_sys::NodeTag::T_ReassignOwnedStmt))
    }
}

/// The roles a list of RoleSpec names (those that exist; `PUBLIC` names
/// none).
///
/// # Safety
/// `roles` must be NULL or a List of RoleSpec nodes.
unsafe fn role_oids(roles: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    // SAFETY: forwarded; get_rolespec_oid with missing_ok gives InvalidOid
    // for a role that does not exist.
    unsafe {
        PgList::<pg_sys::RoleSpec>::from_pg(roles)
            .iter_ptr()
            .filter(|spec| (**spec).roletype != pg_sys::RoleSpecType::ROLESPEC_PUBLIC)
            .map(|spec| pg_sys::get_rolespec_oid(spec, true))
            .filter(|oid| *oid != pg_sys::InvalidOid)
            .collect()
    }
}

/// Before DROP ROLE: refuse it for a role that owns jobs here.
///
/// # Safety
/// `pstmt` must be a role statement ([`is_role_statement`]).
#[pg_guard]
unsafe extern "C-unwind" fn before_role_statement(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the tag was checked by the hook.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        if is_a(stmt, pg_sys::NodeTag::T_DropRoleStmt) {
            let roles = role_oids((*stmt.cast::<pg_sys::DropRoleStmt>()).roles);
            run::jobs::refuse_dropping_owners(&roles);
        }
    }
}

/// After DROP OWNED BY (its privilege checks passed): the roles' jobs go;
/// after REASSIGN OWNED BY: they are the new role's.
///
/// # Safety
/// `pstmt` must be a role statement ([`is_role_statement`]).
#[pg_guard]
unsafe extern "C-unwind" fn after_role_statement(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the tag was checked by the hook.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        if is_a(stmt, pg_sys::NodeTag::T_DropOwnedStmt) {
            let roles = role_oids((*stmt.cast::<pg_sys::DropOwnedStmt>()).roles);
            run::jobs::drop_jobs_of(&roles);
        } else if is_a(stmt, pg_sys::NodeTag::T_ReassignOwnedStmt) {
            let reassign = stmt.cast::<pg_sys::ReassignOwnedStmt>();
            let roles = role_oids((*reassign).roles);
            let to = pg_sys::get_rolespec_oid((*reassign).newrole, false);
            run::jobs::reassign_jobs(&roles, to);
        }
    }
}

/// The CopyStmt of a utility statement, if it is one.
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt.
unsafe fn copy_stmt(pstmt: *mut pg_sys::PlannedStmt) -> Option<*mut pg_sys::CopyStmt> {
    // SAFETY: reads a node pointer and its tag.
    unsafe {
        let node = (*pstmt).utilityStmt;
        (!node.is_null() && is_a(node, pg_sys::NodeTag::T_CopyStmt))
            .then(|| node.cast::<pg_sys::CopyStmt>())
    }
}

/// The options of a COPY statement (DefElem nodes).
///
/// # Safety
/// `copy` must be a valid CopyStmt.
unsafe fn copy_options(copy: *mut pg_sys::CopyStmt) -> Vec<*mut pg_sys::DefElem> {
    // SAFETY: the options list holds DefElem nodes.
    unsafe {
        PgList::<pg_sys::DefElem>::from_pg((*copy).options)
            .iter_ptr()
            .collect()
    }
}

/// The name of a DefElem, lower case.
fn option_name(def: *mut pg_sys::DefElem) -> String {
    // SAFETY: every DefElem of a CopyStmt has a name.
    unsafe {
        CStr::from_ptr((*def).defname)
            .to_string_lossy()
            .to_ascii_lowercase()
    }
}

/// The value of a DefElem when it is a plain word or string; read without
/// any call that could raise.
fn option_word(def: *mut pg_sys::DefElem) -> Option<String> {
    // SAFETY: `arg` is NULL or a node; only a String node's text is read.
    unsafe {
        let arg = (*def).arg;
        if arg.is_null() || !is_a(arg, pg_sys::NodeTag::T_String) {
            return None;
        }
        let text = (*arg.cast::<pg_sys::String>()).sval;
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    }
}

/// The COPY formats this extension writes: `ndjson`, and `json`, the
/// spelling of PostgreSQL 19 (the same lines, and FORCE_ARRAY).
#[derive(Clone, Copy, PartialEq, Eq)]
enum JsonFormat {
    Ndjson,
    Json,
}

/// The extension's own COPY options, beyond PostgreSQL 19's `FORMAT json`.
const EXTENSION_OPTIONS: [&str; 13] = [
    "compression",
    "compression_level",
    "footer",
    "key",
    "after",
    "key_from",
    "key_to",
    "profile",
    "bigint_as_string",
    "numeric_as_string",
    "timestamptz_utc",
    "bytea_base64",
    "omit_nulls",
];

/// Whether this statement is a COPY for this extension: FORMAT ndjson;
/// FORMAT json unless the server has it natively and no option of ours is
/// used; or, on servers without native json, a FORCE_ARRAY that must get
/// PostgreSQL 19's error. Pure reads of the parse tree, so deciding can
/// never raise.
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt.
unsafe fn is_our_copy(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: forwarded.
    unsafe {
        copy_stmt(pstmt).is_some_and(|copy| {
            let options = copy_options(copy);
            let has = |name: &str| options.iter().any(|def| option_name(*def) == name);
            match copy_format(&options) {
                Some(JsonFormat::Ndjson) => true,
                Some(JsonFormat::Json) => {
                    !crate::compat::NATIVE_COPY_JSON || EXTENSION_OPTIONS.iter().any(|o| has(o))
                }
                None => !crate::compat::NATIVE_COPY_JSON && has("force_array"),
            }
        })
    }
}

/// The statement's FORMAT when it is one of ours (the first FORMAT given;
/// PostgreSQL refuses a second).
fn copy_format(options: &[*mut pg_sys::DefElem]) -> Option<JsonFormat> {
    let format = options
        .iter()
        .find(|def| option_name(**def) == "format")
        .and_then(|def| option_word(*def))?;
    if format.eq_ignore_ascii_case("ndjson") {
        Some(JsonFormat::Ndjson)
    } else if format.eq_ignore_ascii_case("json") {
        Some(JsonFormat::Json)
    } else {
        None
    }
}

/// COPY options of an ndjson COPY, validated.
#[derive(Default)]
struct CopyOptions {
    /// TO PROGRAM: the file name is a shell command.
    is_program: bool,
    /// Checked when the options are parsed, as every other option.
    compression: Option<String>,
    compression_level: Option<i32>,
    footer: bool,
    force_array: bool,
    key: Option<String>,
    after: Option<String>,
    key_from: Option<String>,
    key_to: Option<String>,
    profile: Option<String>,
    bigint_as_string: Option<bool>,
    numeric_as_string: Option<bool>,
    timestamptz_utc: Option<bool>,
    bytea_base64: Option<bool>,
    omit_nulls: Option<bool>,
}

fn option_bool(def: *mut pg_sys::DefElem) -> bool {
    // SAFETY: defGetBoolean raises a proper error for a value that is not
    // a boolean.
    unsafe { pg_sys::defGetBoolean(def) }
}

fn option_string(def: *mut pg_sys::DefElem) -> String {
    // SAFETY: defGetString raises a proper error when there is no value.
    unsafe {
        CStr::from_ptr(pg_sys::defGetString(def))
            .to_string_lossy()
            .into_owned()
    }
}

const NDJSON_OPTIONS_HINT: &str =
    "FORMAT ndjson takes COMPRESSION, COMPRESSION_LEVEL, FOOTER, KEY, AFTER, KEY_FROM, KEY_TO, PROFILE, BIGINT_AS_STRING, NUMERIC_AS_STRING, TIMESTAMPTZ_UTC, BYTEA_BASE64, OMIT_NULLS and ENCODING 'UTF8'";
const JSON_OPTIONS_HINT: &str =
    "FORMAT json takes FORCE_ARRAY and the options of FORMAT ndjson: COMPRESSION, COMPRESSION_LEVEL, FOOTER, KEY, AFTER, KEY_FROM, KEY_TO, PROFILE, BIGINT_AS_STRING, NUMERIC_AS_STRING, TIMESTAMPTZ_UTC, BYTEA_BASE64, OMIT_NULLS and ENCODING 'UTF8'";

/// The options of an ndjson or json COPY, or an error for one that does
/// not fit. With json, the errors PostgreSQL 19 defines come first.
fn json_copy_options(copy: *mut pg_sys::CopyStmt) -> CopyOptions {
    // SAFETY: plain field reads of the statement; a valid CopyStmt.
    let (is_from, is_program, defs) =
        unsafe { ((*copy).is_from, (*copy).is_program, copy_options(copy)) };
    let format = copy_format(&defs);
    if format != Some(JsonFormat::Json) && defs.iter().any(|d| option_name(*d) == "force_array") {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "COPY FORCE_ARRAY can only be used with JSON mode",
            Some("write FORMAT json, FORCE_ARRAY"),
        );
    }
    let (format_name, hint) = match format {
        Some(JsonFormat::Json) => ("json", JSON_OPTIONS_HINT),
        _ => ("ndjson", NDJSON_OPTIONS_HINT),
    };
    if is_from {
        if format == Some(JsonFormat::Json) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "COPY FORMAT JSON is not supported for COPY FROM",
                Some("FORMAT json is an export format: use it with COPY ... TO"),
            );
        }
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "COPY FROM with FORMAT ndjson is not supported",
            Some("FORMAT ndjson is an export format: use it with COPY ... TO"),
        );
    }
    let mut options = CopyOptions {
        is_program,
        ..CopyOptions::default()
    };
    for def in defs {
        let name = option_name(def);
        match name.as_str() {
            "format" => {}
            "compression" => options.compression = Some(option_string(def)),
            "compression_level" => {
                // SAFETY: `def` is a DefElem of the parsed statement;
                // defGetInt32 raises on bad values.
                options.compression_level = Some(unsafe { pg_sys::defGetInt32(def) })
            }
            "footer" => options.footer = option_bool(def),
            "key" => options.key = Some(option_string(def)),
            "after" => options.after = Some(option_string(def)),
            "key_from" => options.key_from = Some(option_string(def)),
            "key_to" => options.key_to = Some(option_string(def)),
            "profile" => options.profile = Some(option_string(def)),
            "bigint_as_string" => options.bigint_as_string = Some(option_bool(def)),
            "numeric_as_string" => options.numeric_as_string = Some(option_bool(def)),
            "timestamptz_utc" => options.timestamptz_utc = Some(option_bool(def)),
            "bytea_base64" => options.bytea_base64 = Some(option_bool(def)),
            "omit_nulls" => options.omit_nulls = Some(option_bool(def)),
            "force_array" => options.force_array = option_bool(def),
            "encoding" => {
                let encoding = option_string(def)
                    .replace(['-', '_'], "")
                    .to_ascii_lowercase();
                if encoding != "utf8" {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!(
                            "COPY option \"encoding\" must be UTF8 with FORMAT {format_name}, not \"{}\"",
                            option_string(def)
                        ),
                        Some("JSON output is always UTF-8"),
                    );
                }
            }
            "header" | "delimiter" | "null" | "default" if format == Some(JsonFormat::Json) => {
                raise(
                    PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
                    format!("cannot specify {} in JSON mode", name.to_ascii_uppercase()),
                    Some(hint),
                )
            }
            "header" | "delimiter" | "null" | "quote" | "escape" | "force_quote"
            | "force_not_null" | "force_null" | "freeze" | "default" => raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("COPY option \"{name}\" cannot be used with FORMAT {format_name}"),
                Some(hint),
            ),
            _ => raise(
                PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
                format!("COPY option \"{name}\" not recognized with FORMAT {format_name}"),
                Some(hint),
            ),
        }
    }
    options
}

/// The source of the COPY: a relation (with its column list) or the
/// statement's parsed query.
///
/// # Safety
/// The arguments must be those PostgreSQL passed to the hook.
unsafe fn copy_source(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    copy: *mut pg_sys::CopyStmt,
) -> Source {
    // SAFETY: reads of the statement and catalog lookups in a transaction.
    unsafe {
        if (*copy).relation.is_null() {
            return Source::Parsed(ParsedQuery {
                raw: (*copy).query,
                source_text: query_string,
                location: (*pstmt).stmt_location,
                len: (*pstmt).stmt_len,
            });
        }
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
        Source::Select {
            relation,
            sql: format!("SELECT {list} FROM {only}{name}"),
            qualified_name: name,
        }
    }
}

/// Run an ndjson or json COPY. Our own errors are raised from here, inside the
/// guard; only this path runs Rust code that can fail.
///
/// # Safety
///
/// `pstmt` must be a utility statement holding a CopyStmt, `query_string` its
/// source text, and `qc` PostgreSQL's completion (or null), as the hook passes
/// them.
#[pg_guard]
unsafe extern "C-unwind" fn run_ndjson_copy(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the hook checked that this is a CopyStmt.
    let Some(copy) = (unsafe { copy_stmt(pstmt) }) else {
        return;
    };
    let copy_options = json_copy_options(copy);
    let options = ExportOptions::parse(&RawOptions {
        compression: copy_options.compression.as_deref(),
        compression_level: copy_options.compression_level,
        footer: Some(copy_options.footer),
        force_array: Some(copy_options.force_array),
        key: copy_options.key.as_deref(),
        after: copy_options.after.as_deref(),
        key_from: copy_options.key_from.as_deref(),
        key_to: copy_options.key_to.as_deref(),
        profile: copy_options.profile.as_deref(),
        bigint_as_string: copy_options.bigint_as_string,
        numeric_as_string: copy_options.numeric_as_string,
        timestamptz_utc: copy_options.timestamptz_utc,
        bytea_base64: copy_options.bytea_base64,
        omit_nulls: copy_options.omit_nulls,
        ..Default::default()
    })
    .unwrap_or_else(|e| e.raise());
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
        // SAFETY: the hook's own arguments.
        let source = unsafe { copy_source(pstmt, query_string, copy) };
        let compressed = options.compression != Compression::None;
        let single = run::Single::open(
            source,
            options,
            Destination::Pipe,
            "client (COPY TO STDOUT)",
        );
        let client = CopyOut::begin(compressed);
        let ((), counts, _) = single.run(client, |client, _| client.end());
        counts.rows
    } else if copy_options.is_program {
        // SAFETY: the command is a C string of the statement.
        let command = unsafe { CStr::from_ptr(filename) }
            .to_string_lossy()
            .into_owned();
        run::to_program(
            &command,
            // SAFETY: the hook's own arguments.
            || unsafe { copy_source(pstmt, query_string, copy) },
            options,
        )
        .rows
    } else {
        // SAFETY: the file name is a C string of the statement.
        let target = unsafe { CStr::from_ptr(filename) }
            .to_string_lossy()
            .into_owned();
        // COPY TO 'file' replaces an existing file (or object); atomically here.
        run::to_target(
            &target,
            // SAFETY: the hook's own arguments.
            || unsafe { copy_source(pstmt, query_string, copy) },
            options,
            true,
        )
        .rows
    };
    if !qc.is_null() {
        // SAFETY: PostgreSQL's completion record for this statement.
        unsafe {
            (*qc).commandTag = pg_sys::CommandTag::CMDTAG_COPY;
            (*qc).nprocessed = rows;
        }
    }
}
