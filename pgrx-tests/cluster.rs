//! stream_export_cluster and stream_export_cluster_node: what they refuse
//! before any node is reached or anything is written.

#[pgrx::pg_schema]
mod tests {
    use crate::pgrx_tests::support::sqlstate_of;
    use pgrx::prelude::*;

    const TO: &str = "'s3://bucket/cluster/'";

    #[pg_test]
    fn the_nodes_come_from_one_place() {
        // Neither nodes nor a cluster, and both.
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT * FROM stream_export_cluster('t', {TO}, 'id')"
            )),
            "22023"
        );
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT * FROM stream_export_cluster('t', {TO}, 'id', nodes => ARRAY['host=x'], cluster => 'c')"
            )),
            "22023"
        );
        for nodes in ["ARRAY[]::text[]", "ARRAY[NULL]::text[]", "ARRAY['']"] {
            assert_eq!(
                sqlstate_of(&format!(
                    "SELECT * FROM stream_export_cluster('t', {TO}, 'id', nodes => {nodes})"
                )),
                "22023",
                "{nodes}"
            );
        }
    }

    #[pg_test]
    fn bad_arguments_are_refused_before_any_connection() {
        let cases = [
            ("partitions_per_node => 0", "22023"),
            ("partitions_per_node => 1025", "22023"),
            ("compression => 'lz4'", "22023"),
            ("compression => 'gzip', compression_level => 10", "22023"),
        ];
        for (option, code) in cases {
            assert_eq!(
                sqlstate_of(&format!(
                    "SELECT * FROM stream_export_cluster('t', {TO}, 'id', nodes => ARRAY['host=x'], {option})"
                )),
                code,
                "{option}"
            );
        }
        assert_eq!(
            sqlstate_of(
                "SELECT * FROM stream_export_cluster(NULL, 's3://b/p/', 'id', nodes => ARRAY['host=x'])"
            ),
            "22004"
        );
        // A server directory: a cluster export writes to object storage.
        assert_eq!(
            sqlstate_of(
                "SELECT * FROM stream_export_cluster('t', '/tmp', 'id', nodes => ARRAY['host=x'])"
            ),
            "0A000"
        );
        // No PL/Proxy cluster of that name (PL/Proxy need not be installed).
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT * FROM stream_export_cluster('t', {TO}, 'id', cluster => 'no_such_cluster')"
            )),
            "42704"
        );
    }

    #[pg_test]
    fn the_node_function_takes_only_an_export_id_of_the_coordinator() {
        for id in ["", "x", "../../etc", "0123456789abc", "0123456789ag"] {
            assert_eq!(
                sqlstate_of(&format!(
                    "SELECT * FROM stream_export_cluster_node('t', '/tmp', 'id', 1, 'none', NULL, 'default', '{id}')"
                )),
                "22023",
                "{id}"
            );
        }
    }

    #[pg_test]
    fn only_trusted_roles_run_the_coordinator() {
        let granted: Option<bool> = Spi::get_one(
            "SELECT has_function_privilege('public', 'stream_export_cluster(text, text, text, text[], text, integer, text, integer, boolean, text)', 'EXECUTE')",
        )
        .unwrap();
        assert_eq!(granted, Some(false));
    }
}
