//! stream_export: every line equals `row_to_json(r)::text` for the same row.

#[pgrx::pg_schema]
mod tests {
    use crate::pgrx_tests::support::sqlstate_of;
    use pgrx::prelude::*;

    /// Lines of `stream_export(source)` and of the oracle over `oracle_from`,
    /// both aggregated in the order given by `order`.
    fn export_and_oracle(source: &str, oracle_from: &str) -> (Vec<String>, Vec<String>) {
        let exported: Vec<String> = Spi::get_one_with_args(
            "SELECT coalesce(array_agg(line), '{}') FROM (SELECT stream_export($1) AS line) s",
            &[source.into()],
        )
        .expect("export runs")
        .expect("array is not null");
        let oracle: Vec<String> = Spi::get_one(&format!(
            "SELECT coalesce(array_agg(row_to_json(r)::text), '{{}}') FROM {oracle_from} r"
        ))
        .expect("oracle runs")
        .expect("array is not null");
        (exported, oracle)
    }

    #[pg_test]
    fn table_lines_equal_row_to_json() {
        Spi::run(
            "CREATE TABLE t (id int PRIMARY KEY, name text, score float8, tags text[], doc jsonb, at timestamptz);
             INSERT INTO t VALUES
               (1, 'plain', 1.5, '{a,b}', '{\"k\": [1, 2]}', '2024-01-01 00:00:15.123+00'),
               (2, E'quote \" back \\\\ nl \n tab \t ctl \\x01 é 漢 🎉', 'NaN', '{}', 'null', 'infinity'),
               (3, NULL, '-Infinity', '{NULL,x}', NULL, NULL)",
        )
        .unwrap();
        let (exported, oracle) = export_and_oracle("t", "(SELECT * FROM t) ");
        assert_eq!(exported.len(), 3);
        let mut exported = exported;
        let mut oracle = oracle;
        exported.sort();
        oracle.sort();
        assert_eq!(exported, oracle);
    }

    #[pg_test]
    fn query_lines_equal_row_to_json() {
        let query =
            "SELECT g AS n, g::text || '\"' AS s, NULL::int AS nothing FROM generate_series(1, 2500) g";
        let (exported, oracle) = export_and_oracle(query, &format!("({query})"));
        assert_eq!(exported.len(), 2500);
        assert_eq!(exported, oracle);
    }

    #[pg_test]
    fn schema_qualified_and_quoted_names_resolve() {
        Spi::run(
            "CREATE SCHEMA \"My Schema\";
             CREATE TABLE \"My Schema\".\"Odd \"\"Name\" (\"Col\" int);
             INSERT INTO \"My Schema\".\"Odd \"\"Name\" VALUES (7)",
        )
        .unwrap();
        let (exported, _) = export_and_oracle("\"My Schema\".\"Odd \"\"Name\"", "(SELECT 1) ");
        assert_eq!(exported, vec!["{\"Col\":7}".to_string()]);
    }

    #[pg_test]
    fn empty_table_exports_nothing() {
        Spi::run("CREATE TABLE empty_t (a int)").unwrap();
        let (exported, _) = export_and_oracle("empty_t", "(SELECT 1) ");
        assert!(exported.is_empty());
    }

    #[pg_test]
    fn limit_stops_early() {
        let n: Option<i64> = Spi::get_one(
            "SELECT count(*) FROM (SELECT stream_export('SELECT g FROM generate_series(1, 100000) g') LIMIT 3) s",
        )
        .unwrap();
        assert_eq!(n, Some(3));
    }

    #[pg_test(error = "relation \"no_such_table\" does not exist")]
    fn unknown_table_is_undefined_table() {
        Spi::run("SELECT stream_export('no_such_table')").unwrap();
    }

    #[pg_test]
    fn errors_carry_their_sqlstate() {
        let cases = [
            ("SELECT stream_export('no_such_table')", "42P01"),
            ("SELECT stream_export('not a name or query')", "42P01"),
            ("SELECT stream_export('SELECT 1; SELECT 2')", "22023"),
            ("SELECT stream_export('WITH d AS (DELETE FROM no_table RETURNING 1) SELECT * FROM d')", "22023"),
            ("SELECT stream_export('SELECT FROM WHERE')", "42601"),
            ("SELECT stream_export('SELECT 1/0')", "22012"),
        ];
        for (stmt, expected) in cases {
            assert_eq!(sqlstate_of(stmt), expected, "{stmt}");
        }
    }
}
