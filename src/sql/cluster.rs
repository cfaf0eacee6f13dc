//! Cluster exports in SQL: `stream_export_cluster` on the coordinator,
//! and `stream_export_cluster_node`, which it calls on every node. The
//! work is [`crate::run::cluster`]'s.

use pgrx::prelude::*;

use crate::error::{raise, required};
use crate::options::{ExportOptions, RawOptions};
use crate::run::cluster::{self, ClusterRequest, Nodes};

fn options(
    key: &str,
    compression: Option<&str>,
    compression_level: Option<i32>,
    profile: Option<&str>,
) -> ExportOptions {
    ExportOptions::parse(&RawOptions {
        compression,
        compression_level,
        key: Some(key),
        footer: Some(true),
        profile,
        ..Default::default()
    })
    .unwrap_or_else(|e| e.raise())
}

fn partition_count(value: Option<i32>, name: &str) -> usize {
    match value {
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid value for {name}: {n}"),
            Some("it must be between 1 and 1024"),
        ),
        None => raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("argument \"{name}\" must not be NULL"),
            None,
        ),
    }
}

/// Export `source` from every node of a cluster (libpq connection strings
/// in `nodes`, or the PL/Proxy cluster `cluster`) into `destination`: one
/// directory export per node under `node-<id>/`, each one snapshot, and a
/// manifest of manifests written last. One row per node.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export_cluster(
    source: Option<&str>,
    destination: Option<&str>,
    key: Option<&str>,
    nodes: default!(Option<Vec<Option<String>>>, "NULL"),
    cluster: default!(Option<&str>, "NULL"),
    partitions_per_node: default!(Option<i32>, 1),
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, "NULL"),
    overwrite: default!(Option<bool>, false),
    profile: default!(Option<&str>, "'default'"),
) -> TableIterator<
    'static,
    (
        name!(node, String),
        name!(directory, String),
        name!(reused, bool),
        name!(partitions, i32),
        name!(rows, i64),
        name!(bytes, i64),
        name!(file_bytes, i64),
    ),
> {
    let (source, destination) = (
        required(source, "source"),
        required(destination, "destination"),
    );
    let key = required(key, "key");
    let nodes = match (nodes, cluster) {
        (Some(list), None) => {
            if list.is_empty() || list.iter().any(|c| c.as_deref().is_none_or(str::is_empty)) {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    "nodes must list at least one foreign server or connection string, none of them NULL or empty",
                    None,
                );
            }
            Nodes::Connections(list.into_iter().flatten().collect())
        }
        (None, Some(name)) => Nodes::PlProxy(name),
        _ => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "give either nodes (connection strings) or cluster (a PL/Proxy cluster), not both",
            None,
        ),
    };
    let request = ClusterRequest {
        source,
        key,
        partitions_per_node: partition_count(partitions_per_node, "partitions_per_node"),
        compression: compression.unwrap_or("none"),
        compression_level,
        profile,
        overwrite: overwrite.unwrap_or(false),
        options: options(key, compression, compression_level, profile),
    };
    let outcomes = cluster::export_cluster(destination, nodes, &request);
    TableIterator::new(outcomes.into_iter().map(|n| {
        (
            n.node,
            n.directory,
            n.reused,
            n.partitions,
            n.rows,
            n.bytes,
            n.file_bytes,
        )
    }))
}

/// One node's part of a cluster export, called by `stream_export_cluster`
/// on the node: a directory export of `source` into `directory` whose
/// parts carry the coordinator's export id, under every rule of a
/// directory export (`overwrite`, the lease); `requested_by` is the role
/// that called the cluster export, for the node's audit lines.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export_cluster_node(
    source: Option<&str>,
    directory: Option<&str>,
    key: Option<&str>,
    partitions: Option<i32>,
    compression: Option<&str>,
    compression_level: Option<i32>,
    profile: Option<&str>,
    export_id: Option<&str>,
    overwrite: default!(Option<bool>, false),
    requested_by: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(partitions, i32),
        name!(rows, i64),
        name!(bytes, i64),
        name!(file_bytes, i64),
    ),
> {
    let (source, directory) = (required(source, "source"), required(directory, "directory"));
    let key = required(key, "key");
    let partitions = partition_count(partitions, "partitions");
    let options = options(key, compression, compression_level, profile);
    let totals = cluster::export_node(
        source,
        directory,
        key,
        partitions,
        &options,
        required(export_id, "export_id"),
        overwrite.unwrap_or(false),
        requested_by,
    );
    TableIterator::once((
        totals.partitions,
        totals.rows,
        totals.bytes,
        totals.file_bytes,
    ))
}

pgrx::extension_sql!(
    r#"
-- A superuser may name nodes by connection string, reaching them with the
-- server's password and service files; any other caller names foreign
-- servers and reaches the nodes with its own user mapping's password.
-- Still only for roles a superuser grants it to.
REVOKE EXECUTE ON FUNCTION stream_export_cluster(text, text, text, text[], text, integer, text, integer, boolean, text) FROM PUBLIC;
-- The kind of foreign server that names a cluster export's node: libpq
-- options (host, port, dbname, ...), with user and password in each
-- role's user mapping. No handler: it is not for foreign tables.
CREATE FOREIGN DATA WRAPPER stream_export_nodes;
COMMENT ON FOREIGN DATA WRAPPER stream_export_nodes IS 'pg_stream_export: servers that are nodes of cluster exports (libpq options; user and password in user mappings)';
"#,
    name = "stream_export_cluster_privileges",
    requires = [stream_export_cluster],
);
