//! Resolving the `source` argument: a relation (resolved like `::regclass`)
//! or a single read-only query. Everything else is `42P01`.

use std::ffi::{CStr, CString};

use pgrx::{is_a, pg_sys, PgList, PgSqlErrorCode};

use crate::error::raise;
use crate::ident::{looks_like_query, quote_identifier, split_qualified_name};

/// What an export reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A table, view, materialized view or foreign table, by its quoted,
    /// schema-qualified name.
    Relation {
        oid: pg_sys::Oid,
        qualified_name: String,
        /// Plain, partitioned and materialized tables can carry the unique
        /// index a key needs; views and foreign tables cannot.
        indexable: bool,
    },
    /// A query, checked to be exactly one read-only SELECT / VALUES / TABLE.
    Query(String),
    /// A SELECT built by this extension over one relation (COPY table TO,
    /// an archive's condition); `qualified_name` is the relation's, as for
    /// [`Source::Relation`].
    Select {
        relation: pg_sys::Oid,
        qualified_name: String,
        sql: String,
    },
    /// The query of a COPY statement, as PostgreSQL parsed it.
    Parsed(ParsedQuery),
}

pub use crate::engine::scan::ParsedQuery;

impl Source {
    /// Resolve `source` as the specification says: a relation if it names
    /// one, else a query if it starts like one, else `42P01`.
    pub fn resolve(source: &str) -> Source {
        if let Some(relation) = lookup_relation(source) {
            return relation;
        }
        if looks_like_query(source) {
            return Source::checked_query(source);
        }
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation \"{source}\" does not exist"),
            Some("source must name a table, view or materialized view, or be a query starting with SELECT, WITH, VALUES or TABLE"),
        )
    }

    /// The relation's OID, or InvalidOid for a query.
    pub fn relation_oid(&self) -> pg_sys::Oid {
        match self {
            Source::Relation { oid, .. } => *oid,
            Source::Select { relation, .. } => *relation,
            Source::Query(_) | Source::Parsed(_) => pg_sys::InvalidOid,
        }
    }

    /// A stable text that identifies the source, for resume tokens: a
    /// table's name whether it is read by a function or by `COPY table`,
    /// so that either resumes the other's stream.
    pub fn canonical(&self) -> &str {
        match self {
            Source::Relation { qualified_name, .. } | Source::Select { qualified_name, .. } => {
                qualified_name
            }
            Source::Query(query) => query,
            Source::Parsed(_) => "(query of a COPY statement)",
        }
    }

    /// What a token made before 0.3 may name instead of [`Source::canonical`]:
    /// `COPY table` tokens were bound to the SELECT it runs.
    pub fn former_canonical(&self) -> Option<&str> {
        match self {
            Source::Select { sql, .. } => Some(sql),
            _ => None,
        }
    }

    /// What the source is, for people: the relation's name, the query, or
    /// the COPY statement's text.
    pub fn description(&self) -> String {
        match self {
            Source::Parsed(parsed) => {
                if parsed.source_text.is_null() {
                    return self.canonical().to_string();
                }
                // SAFETY: the statement text outlives the statement; the
                // location and length (when set) lie within it.
                let text = unsafe { std::ffi::CStr::from_ptr(parsed.source_text) }.to_bytes();
                let start = (parsed.location.max(0) as usize).min(text.len());
                let end = if parsed.len > 0 {
                    (start + parsed.len as usize).min(text.len())
                } else {
                    text.len()
                };
                String::from_utf8_lossy(&text[start..end])
                    .trim()
                    .to_string()
            }
            Source::Select { sql, .. } => sql.clone(),
            _ => self.canonical().to_string(),
        }
    }

    /// A query given by the user, checked to be one read-only statement.
    pub fn checked_query(query: &str) -> Source {
        check_single_read_only_query(query);
        Source::Query(query.to_owned())
    }

    /// The rows of the relation `self` for which `condition` holds (the
    /// relation itself without one): a SELECT of it that still names the
    /// relation, so that its unique index vouches for a key.
    pub fn rows_where(self, condition: Option<&str>) -> Source {
        let (
            Some(condition),
            Source::Relation {
                oid,
                qualified_name,
                ..
            },
        ) = (condition, &self)
        else {
            return self;
        };
        check_condition(condition);
        let sql = format!("SELECT * FROM {qualified_name} WHERE ({condition}\n)");
        check_single_read_only_query(&sql);
        Source::Select {
            relation: *oid,
            qualified_name: qualified_name.clone(),
            sql,
        }
    }

    /// A SELECT over every column of the source.
    pub fn select_all_sql(&self) -> String {
        format!(
            "SELECT * FROM {} AS pg_stream_export_source",
            self.sql_from_item()
        )
    }

    /// SQL text usable in a FROM clause (a query comes back parenthesised).
    /// A parsed COPY query has no text of its own: it is only ever walked
    /// whole, through [`crate::engine::scan::Cursor::open_parsed`].
    pub fn sql_from_item(&self) -> String {
        match self {
            Source::Relation { qualified_name, .. } => qualified_name.clone(),
            Source::Query(query) | Source::Select { sql: query, .. } => format!("({query}\n)"),
            Source::Parsed(_) => raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "the query of a COPY statement can only be exported whole",
                Some("KEY works with COPY table TO ...; for a query, use stream_export(query, key => ...)"),
            ),
        }
    }
}

/// The relation `source` names, or `None` when it is not valid name syntax
/// or no such relation is visible.
fn lookup_relation(source: &str) -> Option<Source> {
    let parts = split_qualified_name(source)?;
    if parts.len() > 3 {
        return None;
    }
    let cstrings: Vec<CString> = parts
        .iter()
        .map(|p| CString::new(p.as_str()).ok())
        .collect::<Option<_>>()?;
    // SAFETY: makeRangeVar copies nothing and only stores the pointers, which
    // stay alive (`cstrings`) until RangeVarGetRelidExtended returns; with
    // RVR_MISSING_OK an unknown relation gives InvalidOid instead of an
    // error. The catalog lookups return palloc'd copies or NULL.
    unsafe {
        let (catalog, schema, name) = match cstrings.as_slice() {
            [name] => (std::ptr::null(), std::ptr::null(), name.as_ptr()),
            [schema, name] => (std::ptr::null(), schema.as_ptr(), name.as_ptr()),
            [catalog, schema, name] => (catalog.as_ptr(), schema.as_ptr(), name.as_ptr()),
            _ => return None,
        };
        let range_var = pg_sys::makeRangeVar(schema.cast_mut(), name.cast_mut(), -1);
        (*range_var).catalogname = catalog.cast_mut();
        let oid = pg_sys::RangeVarGetRelidExtended(
            range_var,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        if oid == pg_sys::InvalidOid {
            return None;
        }
        Source::relation(oid)
    }
}

impl Source {
    /// The relation with this OID, as [`Source::resolve`] would give it for
    /// its name (`None` when it is gone): how later steps of an export
    /// (background workers) read the very relation the first one resolved.
    pub fn relation(oid: pg_sys::Oid) -> Option<Source> {
        let qualified_name = qualified_relation_name(oid)?;
        // SAFETY: a catalog lookup by OID.
        let relkind = unsafe { pg_sys::get_rel_relkind(oid) } as u8;
        Some(Source::Relation {
            oid,
            qualified_name,
            indexable: matches!(relkind, b'r' | b'p' | b'm'),
        })
    }

    /// Lock a relation source against renames and drops for the rest of
    /// the transaction, and check that its name still names it: the SQL
    /// text of the walk reads it by name, and a chunked export reads it in
    /// many transactions.
    pub fn lock_relation(&self) {
        let Source::Relation {
            oid,
            qualified_name,
            ..
        } = self
        else {
            return;
        };
        // SAFETY: a lock on a relation OID, held to the end of the transaction.
        unsafe { pg_sys::LockRelationOid(*oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        match qualified_relation_name(*oid) {
            Some(now) if &now == qualified_name => {}
            Some(now) => raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation {qualified_name} was renamed to {now} during the export"),
                Some("export it again under its new name"),
            ),
            None => raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation {qualified_name} was dropped during the export"),
                None,
            ),
        }
    }

    /// The first temporary relation the source reads (its quoted name), if
    /// any: other processes cannot read this session's temporary tables.
    pub fn temporary_relation(&self) -> Option<String> {
        let relations = match self {
            Source::Relation { oid, .. } | Source::Select { relation: oid, .. } => vec![*oid],
            Source::Query(query) => crate::engine::scan::relations_read_by(query),
            Source::Parsed(_) => Vec::new(),
        };
        relations.into_iter().find_map(|oid| {
            // SAFETY: a catalog lookup by OID.
            let temporary = unsafe { pg_sys::get_rel_persistence(oid) } as u8 == b't';
            if temporary {
                qualified_relation_name(oid)
            } else {
                None
            }
        })
    }
}

/// A temporary relation or type of this session whose name is also a
/// relation's or type's in another schema: (the temporary one, the other
/// one), quoted. Other processes resolve names without this session's
/// temporary schema, so a function, view or policy that reads the name
/// unqualified (a table, or a type in a cast) would find the other one
/// there, not the one this session finds.
pub fn shadowing_temporary_relation() -> Option<(String, String)> {
    crate::engine::scan::select_first_row(
        "WITH names (kind, nsp, name) AS ( \
             SELECT 'relation', relnamespace, relname FROM pg_catalog.pg_class \
             WHERE relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
             UNION ALL SELECT 'type', typnamespace, typname FROM pg_catalog.pg_type \
             WHERE NOT (typcategory = 'A' AND typelem <> 0)) \
         SELECT pg_catalog.format('\"%s\".\"%s\"', pg_catalog.replace(tn.nspname, '\"', '\"\"'), \
                                  pg_catalog.replace(t.name, '\"', '\"\"')), \
                pg_catalog.format('\"%s\".\"%s\"', pg_catalog.replace(n.nspname, '\"', '\"\"'), \
                                  pg_catalog.replace(c.name, '\"', '\"\"')) \
         FROM names t JOIN pg_catalog.pg_namespace tn ON tn.oid = t.nsp \
         JOIN names c ON c.kind = t.kind AND c.name = t.name AND c.nsp <> t.nsp \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.nsp \
         WHERE t.nsp = pg_catalog.pg_my_temp_schema() \
           AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%' \
         ORDER BY t.kind, 1, 2 LIMIT 1",
        &[],
        |row| {
            Ok((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
            ))
        },
    )
}

/// `"schema"."name"` of a relation, quoted; `None` when it is gone.
pub fn qualified_relation_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: catalog lookups that return palloc'd copies or NULL.
    unsafe {
        let relname = pg_sys::get_rel_name(oid);
        let nspname = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid));
        if relname.is_null() || nspname.is_null() {
            return None;
        }
        Some(format!(
            "{}.{}",
            quote_identifier(&CStr::from_ptr(nspname).to_string_lossy()),
            quote_identifier(&CStr::from_ptr(relname).to_string_lossy())
        ))
    }
}

/// Refuse anything but exactly one SELECT-shaped statement (which covers
/// VALUES and TABLE) without data-modifying WITH clauses.
fn check_single_read_only_query(query: &str) {
    let Ok(c_query) = CString::new(query) else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "source must not contain a NUL byte",
            None,
        )
    };
    // SAFETY: raw_parser only reads the NUL-terminated string and returns a
    // palloc'd List of RawStmt nodes (or raises a syntax error); every node
    // is checked with is_a before it is cast.
    let problem = unsafe {
        let statements = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            c_query.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ));
        match statements.len() {
            1 => {
                let stmt = statements.get_ptr(0).map(|raw| (*raw).stmt);
                match stmt {
                    Some(node) if is_a(node, pg_sys::NodeTag::T_SelectStmt) => {
                        let select = node.cast::<pg_sys::SelectStmt>();
                        if has_modifying_cte((*select).withClause) {
                            Some("a data-modifying statement in WITH is not allowed")
                        } else {
                            None
                        }
                    }
                    _ => Some("only SELECT, WITH, VALUES and TABLE queries can be exported"),
                }
            }
            0 => Some("the query is empty"),
            _ => Some("the query must be exactly one statement"),
        }
    };
    if let Some(problem) = problem {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid source query: {problem}"),
            Some("an export source query must be a single read-only statement"),
        );
    }
}

/// Check that `condition` is one expression, so that it can stand after
/// `WHERE` in a SELECT and in a DELETE and mean the same in both: parsed
/// as `SELECT WHERE (condition)`, nothing may show up but the WHERE clause
/// (no `) UNION (`, `) ORDER BY`, `) LIMIT` and so on). `42601` otherwise.
fn check_condition(condition: &str) {
    let Ok(c_query) = CString::new(format!("SELECT WHERE ({condition}\n)")) else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "condition must not contain a NUL byte",
            None,
        )
    };
    // SAFETY: as in check_single_read_only_query; the SelectStmt's fields
    // are only compared with NULL.
    let only_a_where_clause = unsafe {
        let statements = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            c_query.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ));
        match statements.get_ptr(0).map(|raw| (*raw).stmt) {
            Some(node) if statements.len() == 1 && is_a(node, pg_sys::NodeTag::T_SelectStmt) => {
                let s = &*node.cast::<pg_sys::SelectStmt>();
                s.op == pg_sys::SetOperation::SETOP_NONE
                    && !s.whereClause.is_null()
                    && [
                        s.targetList,
                        s.fromClause,
                        s.groupClause,
                        s.windowClause,
                        s.distinctClause,
                        s.valuesLists,
                        s.sortClause,
                        s.lockingClause,
                    ]
                    .iter()
                    .all(|list| list.is_null())
                    && s.havingClause.is_null()
                    && s.intoClause.is_null()
                    && s.limitOffset.is_null()
                    && s.limitCount.is_null()
                    && s.withClause.is_null()
            }
            _ => false,
        }
    };
    if !only_a_where_clause {
        raise(
            PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
            "condition must be one boolean expression",
            Some("write it as it would stand after WHERE, naming the table's columns"),
        );
    }
}

/// Whether a WITH clause holds a data-modifying statement.
///
/// # Safety
///
/// `with_clause` must be NULL or a WithClause node from the raw parser.
unsafe fn has_modifying_cte(with_clause: *mut pg_sys::WithClause) -> bool {
    if with_clause.is_null() {
        return false;
    }
    // SAFETY: the raw parser builds `ctes` as a List of CommonTableExpr.
    unsafe {
        let ctes = PgList::<pg_sys::CommonTableExpr>::from_pg((*with_clause).ctes);
        let modifying = ctes.iter_ptr().any(|cte| {
            let query = (*cte).ctequery;
            !query.is_null() && !is_a(query, pg_sys::NodeTag::T_SelectStmt)
        });
        modifying
    }
}
