//! stream_export_plan: partitions that cover the key range exactly once.

#[pgrx::pg_schema]
mod tests {
    use crate::pgrx_tests::support::{lines, sqlstate_of};
    use pgrx::prelude::*;

    /// Export every partition of the plan by its bounds and check that
    /// together they are exactly the keyed export; returns the plan size.
    fn check_cover(table: &str, partitions: i32) -> usize {
        let plan: Vec<(Option<String>, Option<String>)> = Spi::connect(|client| {
            client
                .select(
                    &format!("SELECT lower, upper FROM stream_export_plan('{table}', 'k', {partitions}) ORDER BY partition"),
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| (row.get::<String>(1).unwrap(), row.get::<String>(2).unwrap()))
                .collect()
        });
        assert!(!plan.is_empty());
        assert!(plan.first().unwrap().0.is_none(), "first lower is open");
        assert!(plan.last().unwrap().1.is_none(), "last upper is open");
        for pair in plan.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "ranges are contiguous");
        }
        let quote = |v: &Option<String>| match v {
            Some(text) => format!("'{}'", text.replace('\'', "''")),
            None => "NULL".to_string(),
        };
        let mut joined = Vec::new();
        for (lower, upper) in &plan {
            joined.extend(lines(&format!(
                "SELECT stream_export('{table}', key => 'k', key_from => {}, key_to => {})",
                quote(lower),
                quote(upper)
            )));
        }
        assert_eq!(
            joined,
            lines(&format!("SELECT stream_export('{table}', key => 'k')")),
            "{table}"
        );
        plan.len()
    }

    #[pg_test]
    fn plans_cover_every_key_once_for_many_types() {
        Spi::run(
            "CREATE TABLE p_int (k int PRIMARY KEY);
             CREATE TABLE p_bigint (k bigint PRIMARY KEY);
             CREATE TABLE p_numeric (k numeric PRIMARY KEY);
             CREATE TABLE p_text (k text PRIMARY KEY);
             CREATE TABLE p_uuid (k uuid PRIMARY KEY);
             CREATE TABLE p_tstz (k timestamptz PRIMARY KEY);
             INSERT INTO p_int SELECT g FROM generate_series(1, 5000) g;
             INSERT INTO p_bigint SELECT g::bigint * 1000000007 FROM generate_series(-2500, 2499) g;
             INSERT INTO p_numeric SELECT g / 3.0 FROM generate_series(1, 5000) g;
             INSERT INTO p_text SELECT md5(g::text) || ' it''s' FROM generate_series(1, 5000) g;
             INSERT INTO p_uuid SELECT gen_random_uuid() FROM generate_series(1, 5000) g;
             INSERT INTO p_tstz SELECT timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute 0.5 seconds' FROM generate_series(1, 5000) g;",
        )
        .unwrap();
        for table in [
            "p_int",
            "p_bigint",
            "p_numeric",
            "p_text",
            "p_uuid",
            "p_tstz",
        ] {
            // Without statistics: from the key values.
            assert_eq!(check_cover(table, 4), 4, "{table} without statistics");
            Spi::run(&format!("ANALYZE {table}")).unwrap();
            assert_eq!(check_cover(table, 7), 7, "{table} from pg_stats");
            assert_eq!(check_cover(table, 1), 1);
        }
        let estimate: Option<i64> = Spi::get_one(
            "SELECT sum(estimated_rows)::int8 FROM stream_export_plan('p_int', 'k', 5)",
        )
        .unwrap();
        assert!((4900..=5000).contains(&estimate.unwrap()), "{estimate:?}");
    }

    #[pg_test]
    fn plans_for_queries_and_bad_arguments() {
        Spi::run("CREATE TABLE few (k int PRIMARY KEY); INSERT INTO few VALUES (1), (2)").unwrap();
        let n: Option<i64> = Spi::get_one(
            "SELECT count(*) FROM stream_export_plan('SELECT g AS k FROM generate_series(1, 1000) g', 'k', 4)",
        )
        .unwrap();
        assert_eq!(n, Some(4));
        // More partitions than keys: fewer, still covering.
        assert!(check_cover("few", 10) <= 3);
        assert_eq!(
            sqlstate_of("SELECT * FROM stream_export_plan('few', 'k', 0)"),
            "22023"
        );
        assert_eq!(
            sqlstate_of("SELECT * FROM stream_export_plan('few', 'nope', 2)"),
            "42703"
        );
    }
}
