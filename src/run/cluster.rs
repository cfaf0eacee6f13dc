//! A cluster export: one source exported from many PostgreSQL nodes into
//! one object prefix. The coordinator connects to every node with libpq
//! ([`crate::remote`]), has each run a directory export of its own rows
//! into `<prefix>/node-<id>/<export id>/` (one snapshot per node, a new
//! directory per run), all at once, and writes `manifest.json` last: a
//! manifest of manifests that lists every node's manifest (size and
//! CRC-32 of its bytes) and all parts. The export it replaces (with
//! `overwrite`) stays whole until then; its node directories are removed
//! after.
//!
//! The nodes come from foreign servers with the caller's user mappings
//! (as dblink and postgres_fdw take them), from a PL/Proxy cluster's
//! configuration, or, for superusers only, from libpq connection strings.
//! A role that is not a superuser reaches a node only with credentials of
//! its own: a password from its user mapping, which the node must ask for
//! and get, never the server's password file, service file, client
//! certificates or Kerberos credentials. No connection string or option
//! is ever put into an error or a log line, and the nodes reach the
//! object store with their own configuration.
//!
//! What holds when it fails (a node's error, a node that cannot be reached
//! or goes away, a cancel or `statement_timeout` here): every node still
//! exporting is cancelled and waited for (a node's own directory export
//! removes its parts when it fails), then what this run left under each of
//! its node directories (parts, uploads, leases of a node that died) is
//! removed, and no top-level manifest is written. Nodes that finished keep
//! their complete export: a later call with the same arguments verifies
//! and reuses them, and exports only the nodes whose manifests are missing
//! or damaged.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use serde_json::{json, Value};

use crate::destination::ExportDirectory;
use crate::error::{raise, raise_with_fields, sqlstate_code, ErrorFields};
use crate::ident::quote_identifier;
use crate::layout::{
    is_export_id, is_node_export_directory, new_export_id, node_id_problem, node_run_directory,
    MANIFEST,
};
use crate::options::ExportOptions;
use crate::remote::{parse_conninfo, wait_readable, Link, Params, RemoteError};
use crate::run::manifest::{
    write_manifest, ClusterExport, Consistency, NodeExport, NodePart, Totals,
};

/// The request of the cluster export under a prefix, written before any
/// node starts: a later call reuses node exports only when it asks the
/// same.
const CLUSTER_REQUEST: &str = "cluster.json";
/// How the coordinator shows in the nodes' `pg_stat_activity`.
const APPLICATION_NAME: &str = "pg_stream_export cluster export";
/// How long the coordinator waits on the nodes' sockets between checks
/// for a cancel.
const POLL: Duration = Duration::from_millis(20);

/// Where the nodes are.
pub enum Nodes<'a> {
    /// Foreign server names or (superusers only) libpq connection
    /// strings, one per node.
    Connections(Vec<String>),
    /// A PL/Proxy cluster's name: its partitions' connection strings.
    PlProxy(&'a str),
}

/// What to export from every node.
pub struct ClusterRequest<'a> {
    pub source: &'a str,
    pub key: &'a str,
    pub partitions_per_node: usize,
    pub compression: &'a str,
    pub compression_level: Option<i32>,
    pub profile: Option<&'a str>,
    pub overwrite: bool,
    /// The options as validated here (the nodes validate them again).
    pub options: ExportOptions,
}

/// One node's part of a finished cluster export.
pub struct NodeOutcome {
    pub node: String,
    pub directory: String,
    pub reused: bool,
    pub partitions: i32,
    pub rows: i64,
    pub bytes: i64,
    pub file_bytes: i64,
}

/// A node: its connection, and what is known of it.
struct Node {
    /// How errors name it before its id is known: `#n` and its host.
    label: String,
    link: Link,
    id: String,
    schema: String,
    /// The node must have asked for the password (a connection made for
    /// a role that is not a superuser).
    password_required: bool,
    /// What the node is, as recorded with its export (see [`CLUSTER_REQUEST`]).
    identity: Value,
}

/// The run's nodes, and the node directories this run writes into. When
/// it is dropped armed (an error unwinds), every node still busy is
/// cancelled and waited for, then what this run left in those directories
/// is removed. Nothing here raises.
struct Run {
    nodes: Vec<Node>,
    /// The nodes exporting in this run, with their directories.
    exporting: Vec<(usize, ExportDirectory)>,
    /// Which nodes answered the last query sent to them: a node that
    /// finished its export keeps it (a later call reuses it).
    answered: Vec<bool>,
    export_id: String,
    armed: bool,
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for node in &mut self.nodes {
            node.link.cancel();
        }
        // Each node reports the end of its query (its export removed its
        // parts by then), all within one time limit.
        let deadline = Instant::now() + crate::remote::DRAIN_LIMIT;
        for node in &mut self.nodes {
            node.link.stop_by(deadline);
        }
        self.nodes.clear();
        for (index, directory) in &self.exporting {
            if !self.answered.get(*index).copied().unwrap_or(false) {
                directory.remove_export_leftovers(&self.export_id);
            }
        }
    }
}

/// Raise a node's error as the node reported it, naming the node; a lost
/// connection is `08006`.
fn raise_node_error(node: &str, error: RemoteError) -> ! {
    let code = error
        .sqlstate
        .as_deref()
        .and_then(sqlstate_code)
        .unwrap_or(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE);
    let message = match error.sqlstate {
        Some(_) => format!("node {node}: {}", error.message),
        None => format!("lost the connection to node {node}: {}", error.message),
    };
    raise_with_fields(
        code,
        ErrorFields {
            message,
            detail: error.detail,
            hint: error.hint,
            context: error.context,
        },
    )
}

/// How the coordinator reaches one node: its connection options, and
/// whether the node must authenticate the caller with its password.
struct Address {
    params: Params,
    password_required: bool,
}

/// The options a role that is not a superuser may give for a node (from a
/// foreign server, a PL/Proxy partition or its user mapping): where the
/// node is and how to talk to it, never a file or credential of the
/// coordinator's server (`passfile`, `service`, `sslkey`, `sslcert`,
/// `sslrootcert`, `sslpassword`, `krbsrvname`, ...).
const CALLER_OPTIONS: [&str; 21] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "connect_timeout",
    "sslmode",
    "sslcompression",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "channel_binding",
    "target_session_attrs",
    "load_balance_hosts",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "application_name",
];

/// Where the client certificate and key of a connection made for a role
/// that is not a superuser are looked for: nowhere (libpq sends none when
/// the file does not exist), not the server's `~/.postgresql/`.
const NO_CLIENT_CERTIFICATE: &str = "/nonexistent/pg_stream_export/no-client-certificate";

fn is_superuser() -> bool {
    // SAFETY: a plain check of the current user.
    unsafe { pg_sys::superuser() }
}

/// Does a `nodes` element look like a connection string (rather than the
/// name of a foreign server)?
fn is_connection_string(text: &str) -> bool {
    text.contains('=') || text.starts_with("postgresql://") || text.starts_with("postgres://")
}

/// The `name = 'value'` options of a catalog options list.
///
/// # Safety
/// `list` is NIL or a list of `DefElem` with string values (the options of
/// a catalog entry).
unsafe fn options_of(list: *mut pg_sys::List) -> Params {
    // SAFETY: per the contract; catalog options are always strings.
    unsafe {
        pgrx::PgList::<pg_sys::DefElem>::from_pg(list)
            .iter_ptr()
            .map(|def| {
                let text = |p: *const std::ffi::c_char| {
                    std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
                };
                (text((*def).defname), text(pg_sys::defGetString(def)))
            })
            .collect()
    }
}

/// The foreign server `name`: its OID and options, after checking that the
/// caller may use it (`USAGE`, as dblink and postgres_fdw ask).
fn foreign_server(name: &str, what: &str) -> (pg_sys::Oid, Params) {
    let missing = || -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("{what}: there is no foreign server \"{name}\""),
            Some("Name a server created with CREATE SERVER ... FOREIGN DATA WRAPPER stream_export_nodes OPTIONS (host '...', port '...', dbname '...') (or a postgres_fdw or dblink_fdw server); a superuser may give a libpq connection string instead."),
        )
    };
    let Ok(c_name) = std::ffi::CString::new(name) else {
        missing()
    };
    // SAFETY: a catalog lookup that returns NULL when there is no server.
    let server = unsafe { pg_sys::GetForeignServerByName(c_name.as_ptr(), true) };
    if server.is_null() {
        missing();
    }
    let usage = crate::engine::scan::select_one::<bool>(
        "SELECT pg_catalog.has_server_privilege($1, 'USAGE')",
        &[name.into()],
    );
    if usage != Some(true) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for foreign server {name}"),
            Some("The server's owner grants it: GRANT USAGE ON FOREIGN SERVER ... TO ...;"),
        );
    }
    // SAFETY: `server` is the catalog entry just found, with its options.
    unsafe { ((*server).serverid, options_of((*server).options)) }
}

/// The options of the caller's user mapping for `server` (or PUBLIC's),
/// `None` when there is none.
fn user_mapping(server: pg_sys::Oid) -> Option<Params> {
    PgTryBuilder::new(|| {
        // SAFETY: the mapping of the current user (or PUBLIC) for a server
        // that exists; it raises 42704 when there is none.
        unsafe {
            let mapping = pg_sys::GetUserMapping(pg_sys::GetUserId(), server);
            Some(options_of((*mapping).options))
        }
    })
    .catch_when(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, |_| None)
    .execute()
}

/// The libpq options among `options` (a foreign server's, which may also
/// hold its wrapper's own, such as postgres_fdw's `fetch_size`), without
/// libpq's debug options (`replication`) and `client_encoding`.
fn libpq_options(options: Params) -> Params {
    let known = crate::remote::known_options();
    options
        .into_iter()
        .filter(|(key, _)| {
            key != "client_encoding" && known.iter().any(|o| &o.keyword == key && !o.debug)
        })
        .collect()
}

/// `params` with `overrides` put in place of the options of the same name.
fn with_options(mut params: Params, overrides: Params) -> Params {
    for (key, value) in overrides {
        params.retain(|(k, _)| *k != key);
        params.push((key, value));
    }
    params
}

/// The user and password of a user mapping.
fn credentials(mapping: Params) -> Params {
    mapping
        .into_iter()
        .filter(|(key, _)| matches!(key.as_str(), "user" | "password"))
        .collect()
}

/// The connection of a node named by the foreign server `name`: the
/// server's libpq options with the user mapping's user and password.
fn server_address(name: &str, what: &str, superuser: bool) -> Address {
    let (oid, options) = foreign_server(name, what);
    let mapping = user_mapping(oid);
    if superuser {
        let params = with_options(
            libpq_options(options),
            libpq_options(mapping.unwrap_or_default()),
        );
        return Address {
            params,
            password_required: false,
        };
    }
    let Some(mapping) = mapping else {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("{what}: there is no user mapping for the current role on foreign server \"{name}\""),
            Some("CREATE USER MAPPING FOR CURRENT_USER SERVER ... OPTIONS (user '...', password '...');"),
        );
    };
    refuse_credentials_in(&options, what, &format!("foreign server \"{name}\""));
    callers_address(
        with_options(libpq_options(options), credentials(mapping)),
        what,
    )
}

/// `42501` when a server's own options (not a user mapping's) give a user
/// or a secret to a role that is not a superuser.
fn refuse_credentials_in(options: &Params, what: &str, from: &str) {
    let secret: Vec<String> = crate::remote::known_options()
        .into_iter()
        .filter(|o| o.secret)
        .map(|o| o.keyword)
        .collect();
    if let Some((key, _)) = options
        .iter()
        .find(|(k, _)| *k == "user" || secret.contains(k))
    {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{what}: {from} gives \"{key}\", which only the caller's user mapping may give to a role that is not a superuser"),
            Some("Put user and password in the user mapping of each role that exports (CREATE USER MAPPING FOR ... OPTIONS (user '...', password '...'))."),
        );
    }
}

/// The connection options of a node for a role that is not a superuser
/// (as dblink and postgres_fdw allow them): only the options of
/// [`CALLER_OPTIONS`], no `hostaddr` that differs from `host` (the
/// server's password file is looked up by host), a password, and no
/// client certificate, GSSAPI encryption or authentication without that
/// password.
fn callers_address(params: Params, what: &str) -> Address {
    if let Some((key, _)) = params
        .iter()
        .find(|(key, _)| !CALLER_OPTIONS.contains(&key.as_str()))
    {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{what}: the connection option \"{key}\" is not allowed for a role that is not a superuser"),
            Some("Such a role reaches a node with host, port, dbname, SSL mode and timeouts from a foreign server and user and password from its user mapping; the server's files (passfile, service, sslkey, sslcert, sslrootcert) are not its to use."),
        );
    }
    let value = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, v)| v.as_str())
    };
    if let (Some(host), Some(hostaddr)) = (value("host"), value("hostaddr")) {
        if host != hostaddr {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{what}: hostaddr differs from host, which a role that is not a superuser may not give"),
                Some("Give the node's address as host only."),
            );
        }
    }
    if value("password").is_none_or(str::is_empty) {
        raise(
            PgSqlErrorCode::ERRCODE_S_R_E_PROHIBITED_SQL_STATEMENT_ATTEMPTED,
            format!("{what}: password is required"),
            Some("A role that is not a superuser must give the node's password in its user mapping: CREATE USER MAPPING FOR CURRENT_USER SERVER ... OPTIONS (user '...', password '...');"),
        );
    }
    let known = crate::remote::known_options();
    let knows = |name: &str| known.iter().any(|o| o.keyword == name);
    let mut forced: Params = vec![
        ("sslcert".into(), NO_CLIENT_CERTIFICATE.into()),
        ("sslkey".into(), NO_CLIENT_CERTIFICATE.into()),
    ];
    if knows("gssencmode") {
        forced.push(("gssencmode".into(), "disable".into()));
    }
    if knows("require_auth") {
        forced.push(("require_auth".into(), "scram-sha-256,md5,password".into()));
    }
    Address {
        params: with_options(params, forced),
        password_required: true,
    }
}

/// The nodes of a `nodes` list: foreign server names, or (superusers
/// only) connection strings.
fn listed_addresses(list: &[String], superuser: bool) -> Vec<Address> {
    let count = list.len();
    list.iter()
        .enumerate()
        .map(|(index, entry)| {
            let what = format!("node #{} of {count}", index + 1);
            if !is_connection_string(entry) {
                return server_address(entry, &what, superuser);
            }
            if !superuser {
                raise(
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!("{what}: only a superuser may give a node as a connection string"),
                    Some("Name foreign servers instead: nodes => ARRAY['shard_a', ...], each with a user mapping of yours that gives user and password."),
                );
            }
            let Some(params) = parse_conninfo(entry) else {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("{what}: the connection string cannot be parsed"),
                    Some("Give key=value pairs or a postgresql:// URI."),
                );
            };
            Address {
                params,
                password_required: false,
            }
        })
        .collect()
}

/// The partition number of a PL/Proxy server option: `p0` or PL/Proxy's
/// own `partition_0`.
fn plproxy_partition_number(key: &str) -> Option<usize> {
    let digits = key
        .strip_prefix("partition_")
        .or_else(|| key.strip_prefix('p'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The nodes of the PL/Proxy cluster `name`: the partitions of its SQL/MED
/// server (`CREATE SERVER name FOREIGN DATA WRAPPER plproxy OPTIONS (p0
/// '...', ...)`, or `partition_0`, ...), with the user and password of the
/// current user's mapping (or PUBLIC's), or else (superusers only) what
/// its configuration function `plproxy.get_cluster_partitions(name)`
/// returns. A partition listed twice (PL/Proxy wants a power of two) is
/// one node.
fn plproxy_addresses(name: &str, superuser: bool) -> Vec<Address> {
    let is_plproxy_server = crate::engine::scan::select_one::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_foreign_server s \
           JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw \
           WHERE s.srvname = $1 AND w.fdwname = 'plproxy')",
        &[name.into()],
    ) == Some(true);
    let what = format!("PL/Proxy cluster \"{name}\"");
    if is_plproxy_server {
        let (oid, options) = foreign_server(name, &what);
        let mapping = credentials(user_mapping(oid).unwrap_or_default());
        let mut partitions: Vec<(usize, String)> = options
            .into_iter()
            .filter_map(|(key, value)| Some((plproxy_partition_number(&key)?, value)))
            .collect();
        partitions.sort();
        let mut seen = std::collections::HashSet::new();
        let partitions: Vec<String> = partitions
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| seen.insert(c.clone()))
            .collect();
        let count = partitions.len();
        let addresses = partitions
            .iter()
            .enumerate()
            .map(|(index, conninfo)| {
                let what = format!("node #{} of {count}", index + 1);
                let Some(params) = parse_conninfo(conninfo) else {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("{what}: the connection string of PL/Proxy cluster \"{name}\" cannot be parsed"),
                        None,
                    );
                };
                if superuser {
                    Address {
                        params: with_options(params, mapping.clone()),
                        password_required: false,
                    }
                } else {
                    if params.iter().any(|(key, _)| key == "password") {
                        refuse_credentials_in(&params, &what, &format!("PL/Proxy cluster \"{name}\""));
                    }
                    callers_address(with_options(params, mapping.clone()), &what)
                }
            })
            .collect::<Vec<Address>>();
        if count == 0 {
            no_plproxy_cluster(name);
        }
        return addresses;
    }
    let has_function = crate::engine::scan::select_one::<bool>(
        "SELECT pg_catalog.to_regprocedure('plproxy.get_cluster_partitions(text)') IS NOT NULL",
        &[],
    ) == Some(true);
    if !has_function {
        no_plproxy_cluster(name);
    }
    if !superuser {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("only a superuser may export the PL/Proxy cluster \"{name}\" of plproxy.get_cluster_partitions()"),
            Some("Define the cluster as a server of the plproxy foreign data wrapper, with a user mapping of yours that gives user and password."),
        );
    }
    let found = Spi::connect(|client| -> pgrx::spi::SpiResult<Vec<String>> {
        let rows = client.select(
            "SELECT p::text FROM plproxy.get_cluster_partitions($1) p",
            None,
            &[name.into()],
        )?;
        let mut partitions = Vec::new();
        for row in rows {
            partitions.extend(row.get::<String>(1)?);
        }
        Ok(partitions)
    });
    let partitions = match found {
        Ok(partitions) => partitions,
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("reading the PL/Proxy cluster \"{name}\" failed: {e}"),
            None,
        ),
    };
    let mut seen = std::collections::HashSet::new();
    let partitions: Vec<String> = partitions
        .into_iter()
        .filter(|c| seen.insert(c.clone()))
        .collect();
    let count = partitions.len();
    let addresses: Vec<Address> = partitions
        .iter()
        .enumerate()
        .map(|(index, conninfo)| match parse_conninfo(conninfo) {
            Some(params) => Address {
                params,
                password_required: false,
            },
            None => raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "node #{} of {count}: the connection string of PL/Proxy cluster \"{name}\" cannot be parsed",
                    index + 1
                ),
                None,
            ),
        })
        .collect();
    if addresses.is_empty() {
        no_plproxy_cluster(name);
    }
    addresses
}

fn no_plproxy_cluster(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("there is no PL/Proxy cluster \"{name}\""),
        Some("Define it as a server of the plproxy foreign data wrapper (CREATE SERVER ... FOREIGN DATA WRAPPER plproxy OPTIONS (p0 '...')), or with plproxy.get_cluster_partitions(), or pass nodes => ARRAY['server', ...]."),
    )
}

/// The session settings a node must share with the caller for its lines
/// to be what `row_to_json` gives here: names, then values.
/// The object store profile the caller chose is used on the nodes too (a
/// profile name, never a secret; each node has its own configuration).
const FORWARDED_SETTINGS: [&str; 7] = [
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "bytea_output",
    "DateStyle",
    "lc_monetary",
    "pg_stream_export.object_store_profile",
];
/// How many of [`FORWARDED_SETTINGS`] (the first ones) change the lines.
const LINE_SETTINGS: usize = 6;

fn forwarded_settings() -> Vec<String> {
    FORWARDED_SETTINGS
        .iter()
        .map(|name| {
            crate::engine::scan::select_one::<String>(
                "SELECT pg_catalog.current_setting($1)",
                &[(*name).into()],
            )
            .unwrap_or_default()
        })
        .collect()
}

/// Wait until every node is connected (or raise `08001` naming the first
/// that cannot be, once `timeout` passed for it).
fn connect_all(nodes: &mut [Node], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for node in nodes.iter_mut() {
            match node.link.poll_connect() {
                Ok(true) if node.password_required && !node.link.used_password() => raise(
                    PgSqlErrorCode::ERRCODE_S_R_E_PROHIBITED_SQL_STATEMENT_ATTEMPTED,
                    format!("could not connect to node {}: password is required", node.label),
                    Some("A role that is not a superuser may only reach a node that asks for the password of its user mapping; the node's authentication method (pg_hba.conf) must be changed."),
                ),
                Ok(true) => {}
                Ok(false) => waiting.push(node.link.socket()),
                Err(e) => raise(
                    PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    format!("could not connect to node {}: {}", node.label, e.message),
                    Some("Check the node's connection string, and that the server is up and accepts the coordinator (pg_hba.conf, the server's password file or service file)."),
                ),
            }
        }
        if waiting.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let node = nodes
                .iter()
                .find(|n| n.link.connecting())
                .map_or_else(String::new, |n| n.label.clone());
            raise(
                PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!(
                    "could not connect to node {node}: no connection after {} ms",
                    timeout.as_millis()
                ),
                Some("Raise pg_stream_export.node_connect_timeout, or check that the node is reachable."),
            );
        }
        wait_readable(&waiting, Duration::from_millis(10));
        pgrx::check_for_interrupts!();
    }
}

/// Send `sql` with `params` (from `params_of`) to every node in `which`
/// and wait for all of them; the first error raises (the others are then
/// cancelled by [`Run`]'s drop). Returns each node's rows.
fn run_on(
    run: &mut Run,
    which: &[usize],
    sql_of: &dyn Fn(&Node) -> String,
    params_of: &dyn Fn(&Node) -> Vec<Option<String>>,
    claim_check: &dyn Fn(),
) -> Vec<crate::remote::Rows> {
    run.answered = vec![false; run.nodes.len()];
    for &index in which {
        let node = &mut run.nodes[index];
        let (sql, params) = (sql_of(node), params_of(node));
        let params: Vec<Option<&str>> = params.iter().map(|p| p.as_deref()).collect();
        if let Err(e) = node.link.send(&sql, &params) {
            raise_node_error(&node.label, e);
        }
    }
    let mut results: Vec<Option<crate::remote::Rows>> = vec![None; which.len()];
    loop {
        let mut sockets = Vec::new();
        for (slot, &index) in which.iter().enumerate() {
            if results[slot].is_some() {
                continue;
            }
            let node = &mut run.nodes[index];
            match node.link.poll_result() {
                Ok(Some(rows)) => {
                    run.answered[index] = true;
                    results[slot] = Some(rows);
                }
                Ok(None) => sockets.push(node.link.socket()),
                Err(e) => {
                    let label = node.label.clone();
                    raise_node_error(&label, e)
                }
            }
        }
        if sockets.is_empty() {
            return results.into_iter().map(Option::unwrap_or_default).collect();
        }
        claim_check();
        wait_readable(&sockets, POLL);
        // A cancel or statement_timeout is raised here; the drop of `run`
        // stops the nodes.
        pgrx::check_for_interrupts!();
    }
}

/// What tells one server's database from another's: the system identifier
/// (shared by a primary and its physical replicas), the postmaster's start
/// time (not shared by them) and the database.
const SERVER_IDENTITY: &str =
    "(SELECT s.system_identifier::text FROM pg_catalog.pg_control_system() s), \
     pg_catalog.pg_postmaster_start_time()::text, \
     pg_catalog.current_database()::text";

/// [`SERVER_IDENTITY`] of the coordinator.
fn server_identity() -> Vec<Option<String>> {
    crate::engine::scan::select_first_row(&format!("SELECT {SERVER_IDENTITY}"), &[], |row| {
        Ok((1..=3)
            .map(|i| row.get::<String>(i).ok().flatten())
            .collect::<Vec<_>>())
    })
    .unwrap_or_default()
}

/// The node's id: `pg_stream_export.node_id`, else `cluster_name`.
fn node_id_of(label: &str, setting: Option<&str>, cluster_name: Option<&str>) -> String {
    let id = setting
        .filter(|s| !s.is_empty())
        .or(cluster_name.filter(|s| !s.is_empty()));
    let Some(id) = id else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("node {label} has no node id"),
            Some("Set pg_stream_export.node_id (or cluster_name) on every node: ALTER SYSTEM SET pg_stream_export.node_id = 'a'; SELECT pg_reload_conf();"),
        );
    };
    if let Some(problem) = node_id_problem(id) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("node {label} has the node id \"{id}\", which cannot name a directory"),
            Some(problem),
        );
    }
    id.to_owned()
}

/// A node's export as its manifest records it, checked against the
/// request; `None` when it is not one this call can reuse.
fn node_export_of(
    id: &str,
    directory: &str,
    bytes: &[u8],
    request: &ClusterRequest<'_>,
    reused: bool,
) -> Option<(NodeExport, Vec<NodePart>)> {
    let manifest: Value = serde_json::from_slice(bytes).ok()?;
    let matches = manifest["consistency"] == "snapshot"
        && manifest["key"] == request.key
        && manifest["compression"] == request.options.compression.to_string();
    if !matches {
        return None;
    }
    let directory = directory.to_owned();
    let parts: Vec<NodePart> = manifest["parts"]
        .as_array()?
        .iter()
        .map(|part| NodePart {
            node: id.to_owned(),
            file: format!("{directory}{}", part["file"].as_str().unwrap_or("")),
            rows: part["rows"].as_u64().unwrap_or(0),
            bytes: part["bytes"].as_u64().unwrap_or(0),
            file_bytes: part["file_bytes"].as_u64().unwrap_or(0),
            crc32: part["crc32"].as_str().unwrap_or("").to_owned(),
        })
        .collect();
    let text = |field: &str| manifest[field].as_str().unwrap_or("").to_owned();
    let total = |field: &str| manifest["totals"][field].as_u64().unwrap_or(0);
    Some((
        NodeExport {
            node: id.to_owned(),
            manifest: format!("{directory}{MANIFEST}"),
            directory,
            manifest_bytes: bytes.len() as u64,
            manifest_crc32: format!("{:08x}", crc32fast::hash(bytes)),
            export_id: text("export_id"),
            snapshot: text("snapshot"),
            snapshot_time: text("snapshot_time"),
            partitions: parts.len(),
            rows: total("rows"),
            bytes: total("bytes"),
            file_bytes: total("file_bytes"),
            reused,
        },
        parts,
    ))
}

/// The node directories of the cluster exports made at `top` so far: those
/// its manifest of manifests lists (a node directory itself for exports
/// before 0.4.0), and every run directory its record names (`runs`: run
/// id, and the nodes of that run), whether that run finished or not.
fn replaced_node_directories(top: &ExportDirectory, runs: Option<&Value>) -> Vec<String> {
    let mut directories = std::collections::BTreeSet::new();
    let manifest = top
        .read_small(MANIFEST)
        .filter(|bytes| bytes.len() as u64 <= crate::sink::verify::MANIFEST_LIMIT)
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    for node in manifest
        .as_ref()
        .and_then(|m| m["nodes"].as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(directory)) = (node["node"].as_str(), node["directory"].as_str())
        else {
            continue;
        };
        if node_id_problem(id).is_none() && is_node_export_directory(id, directory) {
            directories.insert(directory.to_owned());
        }
    }
    for (run, recorded) in runs.and_then(Value::as_object).into_iter().flatten() {
        if !is_export_id(run) {
            continue;
        }
        for id in recorded["nodes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(id, _)| id)
        {
            if node_id_problem(id).is_none() {
                directories.insert(node_run_directory(id, run));
            }
        }
    }
    directories.into_iter().collect()
}

fn now_text() -> String {
    crate::engine::scan::select_one::<String>(
        "SELECT pg_catalog.to_char(pg_catalog.clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        &[],
    )
    .unwrap_or_default()
}

/// Export `request.source` from every node into `destination` (an object
/// prefix), then write the manifest of manifests. Returns each node's
/// part, in the order the nodes were given.
pub fn export_cluster(
    destination: &str,
    nodes: Nodes<'_>,
    request: &ClusterRequest<'_>,
) -> Vec<NodeOutcome> {
    let top = ExportDirectory::open(destination);
    if matches!(top, ExportDirectory::Server(_)) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "a cluster export writes to object storage",
            Some("Give an s3:// prefix that every node and the coordinator can reach."),
        );
    }
    let superuser = is_superuser();
    let addresses = match nodes {
        Nodes::Connections(list) => listed_addresses(&list, superuser),
        Nodes::PlProxy(name) => plproxy_addresses(name, superuser),
    };
    let settings = forwarded_settings();
    let export_id = new_export_id();
    let started_at = now_text();
    // Held until the manifest of manifests is in place: one cluster export
    // per prefix, and none where one finished unless `overwrite`.
    let claim = top.claim_manifest(request.overwrite, &export_id);
    let claim_check = || top.check_claim(&claim);
    // The export being overwritten stays whole until the new manifest of
    // manifests replaces it: every run writes into node directories of its
    // own (`node-<id>/<export id>/`), and what the old export had there is
    // removed only once the new one is committed.

    let count = addresses.len();
    let caller = crate::engine::scan::select_one::<String>("SELECT current_user::text", &[])
        .unwrap_or_default();
    // The coordinator's row in stream_export_activity and its audit line,
    // under the calling role.
    let mut tracked = crate::activity::Tracked::start(crate::activity::Description {
        source: request.source.to_owned(),
        destination: top.describe(),
        format: format!(
            "cluster nodes={count} partitions_per_node={} {}",
            request.partitions_per_node,
            request.options.describe()
        ),
        estimated_rows: None,
    });
    let mut run = Run {
        nodes: Vec::with_capacity(count),
        exporting: Vec::new(),
        answered: Vec::new(),
        export_id: export_id.clone(),
        armed: true,
    };
    for (index, address) in addresses.iter().enumerate() {
        let label = format!("#{} of {count}", index + 1);
        match Link::start_params(&address.params, APPLICATION_NAME) {
            Ok(link) => run.nodes.push(Node {
                label,
                link,
                id: String::new(),
                schema: String::new(),
                password_required: address.password_required,
                identity: Value::Null,
            }),
            Err(e) => raise(
                PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("could not connect to node {label}: {}", e.message),
                None,
            ),
        }
    }
    connect_all(&mut run.nodes, crate::gucs::node_connect_timeout());

    // Who each node is, in which schema it has the extension; and the
    // caller's settings that change the lines.
    let all: Vec<usize> = (0..count).collect();
    let described = run_on(
        &mut run,
        &all,
        &|_| {
            "SELECT n.nspname::text, e.extversion::text, \
               pg_catalog.current_setting('pg_stream_export.node_id', true), \
               pg_catalog.current_setting('cluster_name'), \
               pg_catalog.set_config('TimeZone', $1, false), \
               pg_catalog.set_config('IntervalStyle', $2, false), \
               pg_catalog.set_config('extra_float_digits', $3, false), \
               pg_catalog.set_config('bytea_output', $4, false), \
               pg_catalog.set_config('DateStyle', $5, false), \
               pg_catalog.set_config('lc_monetary', $6, false), \
               pg_catalog.set_config('pg_stream_export.object_store_profile', $7, false), \
               {SERVER_IDENTITY}, current_user::text \
             FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'pg_stream_export'"
                .replace("{SERVER_IDENTITY}", SERVER_IDENTITY)
        },
        &|_| settings.iter().cloned().map(Some).collect(),
        &claim_check,
    );
    let version = env!("CARGO_PKG_VERSION");
    let coordinator = server_identity();
    for (node, rows) in run.nodes.iter_mut().zip(described) {
        // The coordinator's own database as a node would export with a
        // second session of this server, which can wait on this
        // transaction's locks until a timeout.
        if let Some(row) = rows.first() {
            let identity: Vec<Option<String>> = row.iter().skip(11).take(3).cloned().collect();
            if identity.len() == 3
                && identity.iter().all(Option::is_some)
                && identity == coordinator
            {
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "node {} is the coordinator's own database",
                        node.label
                    ),
                    Some("List the shards, not the server you call stream_export_cluster on; to export this database, use stream_export_to_directory."),
                );
            }
        }
        let Some(row) = rows.into_iter().next() else {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!(
                    "node {}: extension \"pg_stream_export\" is not installed in its database",
                    node.label
                ),
                Some("CREATE EXTENSION pg_stream_export on every node, in the database the connection string names."),
            );
        };
        let field = |i: usize| row.get(i).cloned().flatten();
        if field(1).as_deref() != Some(version) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "node {} has pg_stream_export {}, the coordinator {version}",
                    node.label,
                    field(1).unwrap_or_default()
                ),
                Some("Install the same version everywhere, then ALTER EXTENSION pg_stream_export UPDATE on each node."),
            );
        }
        node.id = node_id_of(&node.label, field(2).as_deref(), field(3).as_deref());
        node.label = format!("\"{}\"", node.id);
        node.schema = field(0).unwrap_or_default();
        // Which server and database the node's rows come from, and as
        // which role (its privileges and row security choose the rows).
        node.identity = json!({
            "system_identifier": field(11),
            "database": field(13),
            "role": field(14),
        });
    }
    let mut ids = std::collections::HashSet::new();
    for node in &run.nodes {
        if !ids.insert(node.id.clone()) {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("two nodes have the node id \"{}\"", node.id),
                Some("Every node needs its own pg_stream_export.node_id (or cluster_name); list each node once."),
            );
        }
    }

    // Reuse the node exports an earlier call left complete when they were
    // made as this call would make them: the same request, the same
    // settings that change the lines, and the same node (server, database,
    // role). Export the others again.
    let asked = json!({
        "source": request.source,
        "key": request.key,
        "compression": request.options.compression.to_string(),
        "compression_level": request.options.compression_level,
        "partitions_per_node": request.partitions_per_node,
        "profile": request.profile,
        "settings": FORWARDED_SETTINGS[..LINE_SETTINGS]
            .iter()
            .zip(&settings)
            .map(|(name, value)| ((*name).to_owned(), Value::from(value.as_str())))
            .collect::<serde_json::Map<String, Value>>(),
    });
    let recorded_runs = top
        .read_small(CLUSTER_REQUEST)
        .filter(|bytes| bytes.len() as u64 <= crate::sink::verify::MANIFEST_LIMIT)
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .filter(|earlier| earlier["pg_stream_export_cluster"] == 2)
        .map(|mut earlier| earlier["runs"].take());
    // The node directories this prefix's cluster exports made, and only
    // those, go once this one is committed (never anything else under the
    // prefix that happens to start with "node-").
    let replaced = replaced_node_directories(&top, recorded_runs.as_ref());
    let earlier_runs = if request.overwrite {
        None
    } else {
        recorded_runs.clone()
    };
    let made_as_asked = |node: &Node, run: &Value| {
        run["request"] == asked && run["nodes"][&node.id] == node.identity
    };
    let mut finished: Vec<Option<(NodeExport, Vec<NodePart>)>> = vec![None; count];
    let mut to_export = Vec::new();
    let mut runs = serde_json::Map::new();
    let earlier: Vec<(&String, &Value)> = earlier_runs
        .as_ref()
        .and_then(Value::as_object)
        .map(|runs| runs.iter().filter(|(id, _)| is_export_id(id)).collect())
        .unwrap_or_default();
    for (index, node) in run.nodes.iter().enumerate() {
        // A node export an earlier run of the same request finished, whole.
        let reusable = earlier
            .iter()
            .filter(|(_, earlier_run)| made_as_asked(node, earlier_run))
            .find_map(|(run_id, _)| {
                let relative = node_run_directory(&node.id, run_id);
                let directory = top.child(&relative)?;
                let bytes = directory.read_small(MANIFEST)?;
                let export = node_export_of(&node.id, &relative, &bytes, request, true)
                    .filter(|(export, _)| export.export_id == **run_id)?;
                let (ok, ..) = crate::run::verify_directory(&directory, &mut || {
                    pgrx::check_for_interrupts!();
                });
                ok.then_some(export)
            });
        if let Some(export) = reusable {
            let id = export.0.export_id.clone();
            if let Some(earlier) = earlier_runs.as_ref().and_then(|runs| runs.get(&id)) {
                runs.entry(id).or_insert_with(|| earlier.clone());
            }
            finished[index] = Some(export);
            continue;
        }
        let Some(directory) = top.child(&node_run_directory(&node.id, &export_id)) else {
            continue;
        };
        to_export.push(index);
        run.exporting.push((index, directory));
    }
    runs.insert(
        export_id.clone(),
        json!({
            "request": asked,
            "nodes": run
                .nodes
                .iter()
                .map(|node| (node.id.clone(), node.identity.clone()))
                .collect::<serde_json::Map<String, Value>>(),
        }),
    );
    // Until this export is committed the record keeps every run it had, so
    // that their directories stay known (for a later call to reuse or
    // remove); once committed, only the runs the new manifest uses.
    let committed_record = json!({"pg_stream_export_cluster": 2, "runs": runs.clone()});
    let mut every_run = recorded_runs
        .as_ref()
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    every_run.extend(runs);
    let record = json!({"pg_stream_export_cluster": 2, "runs": every_run});
    top.write_small(CLUSTER_REQUEST, (record.to_string() + "\n").as_bytes());

    let level = request.compression_level.map(|l| l.to_string());
    let partitions = request.partitions_per_node.to_string();
    let results = run_on(
        &mut run,
        &to_export,
        &|node| {
            format!(
                "SELECT partitions, rows, bytes, file_bytes FROM {}.stream_export_cluster_node($1, $2, $3, $4::integer, $5, $6::integer, $7, $8, $9::boolean, $10)",
                quote_identifier(&node.schema)
            )
        },
        &|node| {
            let directory = top
                .child(&node_run_directory(&node.id, &export_id))
                .map(|d| d.describe());
            vec![
                Some(request.source.to_owned()),
                directory,
                Some(request.key.to_owned()),
                Some(partitions.clone()),
                Some(request.compression.to_owned()),
                level.clone(),
                request.profile.map(str::to_owned),
                Some(export_id.clone()),
                // The node's directory is new: nothing there to replace.
                Some(false.to_string()),
                Some(caller.clone()),
            ]
        },
        &claim_check,
    );
    drop(results);
    for &index in &to_export {
        let node = &run.nodes[index];
        let relative = node_run_directory(&node.id, &export_id);
        let directory = top.child(&relative);
        let bytes = directory.and_then(|d| d.read_small(MANIFEST));
        let export = bytes
            .as_deref()
            .and_then(|b| node_export_of(&node.id, &relative, b, request, false))
            .filter(|(export, _)| export.export_id == export_id);
        let Some(export) = export else {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!(
                    "node {}: its manifest is not the one its export just wrote",
                    node.label
                ),
                Some("Another export may have written into the node's directory; export again."),
            );
        };
        finished[index] = Some(export);
    }

    // The manifest of manifests: the commit point.
    let finished: Vec<(NodeExport, Vec<NodePart>)> = finished.into_iter().flatten().collect();
    let mut totals = Totals {
        nodes: Some(finished.len()),
        partitions: Some(finished.iter().map(|(n, _)| n.partitions).sum()),
        ..Totals::default()
    };
    for (node, _) in &finished {
        totals.rows += node.rows;
        totals.bytes += node.bytes;
        totals.file_bytes += node.file_bytes;
    }
    let export = ClusterExport {
        consistency: Consistency::PerNode,
        export_id: export_id.clone(),
        source: request.source.to_owned(),
        key: request.key.to_owned(),
        compression: request.options.compression.to_string(),
        compression_level: request.options.compression_level,
        partitions_per_node: request.partitions_per_node,
        started_at,
        finished_at: now_text(),
        nodes: finished.iter().map(|(n, _)| n.clone()).collect(),
    };
    let parts = finished
        .iter()
        .flat_map(|(_, parts)| parts.iter().cloned().map(Ok));
    let mut parts = Some(parts);
    let kept: Vec<String> = finished.iter().map(|(n, _)| n.directory.clone()).collect();
    top.commit_manifest(
        claim,
        &export_id,
        request.overwrite,
        &mut |out| {
            let parts = parts.take().into_iter().flatten();
            write_manifest(out, &export, &totals, parts)
        },
        // From the commit point on, the manifest of manifests may list
        // every node's parts: nothing may remove them.
        &mut || run.armed = false,
        // Committed: the node directories of the export it replaced and of
        // earlier runs go (those this export lists stay).
        &mut || {
            let gone: Vec<String> = replaced
                .iter()
                .filter(|d| !kept.contains(d))
                .cloned()
                .collect();
            top.remove_node_directories(&gone);
            top.try_write_small(
                CLUSTER_REQUEST,
                (committed_record.to_string() + "\n").as_bytes(),
            );
        },
    );
    tracked.job_progress(totals.rows, totals.bytes);
    tracked.written(totals.file_bytes);
    tracked.complete(None);
    finished
        .into_iter()
        .map(|(node, _)| NodeOutcome {
            directory: format!("{}{}", top.describe(), node.directory),
            node: node.node,
            reused: node.reused,
            partitions: node.partitions as i32,
            rows: node.rows as i64,
            bytes: node.bytes as i64,
            file_bytes: node.file_bytes as i64,
        })
        .collect()
}

/// A node's part of a cluster export: a directory export of `source`
/// under the coordinator's export id, with every rule of a directory
/// export (`58P02` where an export finished unless `overwrite`, the lease),
/// so that calling it by hand gives no more than `stream_export_to_directory`
/// does. An export id that names the finished export's parts is refused
/// before anything is removed.
#[allow(clippy::too_many_arguments)]
pub fn export_node(
    source: &str,
    directory: &str,
    key: &str,
    partitions: usize,
    options: &ExportOptions,
    export_id: &str,
    overwrite: bool,
    requested_by: Option<&str>,
) -> crate::run::parallel::DirectoryTotals {
    let valid_id = export_id.len() == 12 && export_id.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid_id {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid export id \"{export_id}\""),
            Some("stream_export_cluster_node is called by stream_export_cluster with an id of 12 hexadecimal digits."),
        );
    }
    let dir = ExportDirectory::open(directory);
    let finished = dir
        .read_small(MANIFEST)
        .filter(|bytes| bytes.len() as u64 <= crate::sink::verify::MANIFEST_LIMIT)
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    if let Some(finished) = finished {
        let own = format!("part-{export_id}-");
        let collides = finished["export_id"] == export_id
            || crate::layout::manifest_parts(&finished)
                .iter()
                .any(|part| part.starts_with(&own));
        if collides {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("the export finished in {directory} has the export id \"{export_id}\""),
                Some("stream_export_cluster_node is called by stream_export_cluster, with a new export id for every run."),
            );
        }
        if !overwrite {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("{directory} holds a finished export"),
                Some("stream_export_cluster_node replaces one only with overwrite => true, as stream_export_to_directory does."),
            );
        }
    }
    // The role that called the cluster export, as printable text.
    let requested_by = requested_by.map(|who| {
        who.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(64)
            .collect::<String>()
    });
    crate::activity::set_requested_by(requested_by);
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            crate::activity::set_requested_by(None);
        }
    }
    let _forget = Forget;
    crate::run::parallel::export_partitioned(
        source,
        &dir,
        key,
        partitions,
        options,
        partitions,
        overwrite,
        Some(export_id.to_owned()),
    )
}
