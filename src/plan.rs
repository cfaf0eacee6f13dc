//! Partition planning: boundaries that split a key's range into ranges of
//! about equal row counts, from pg_stats when the key has a histogram, else
//! from the key values themselves (a sample for large tables).

use pgrx::spi::Spi;
use pgrx::PgSqlErrorCode;

use crate::error::raise;
use crate::ident::quote_identifier;
use crate::source::Source;

/// A nullable SQL text array.
type TextArray = Option<Vec<Option<String>>>;

/// Rows a fallback sample aims at.
const SAMPLE_ROWS: f64 = 100_000.0;

/// Pick `partitions - 1` evenly spaced values of sorted `values`, without
/// repeats (equal neighbours would make an empty range).
pub fn pick_evenly(values: &[String], partitions: usize) -> Vec<String> {
    let mut picked: Vec<String> = Vec::new();
    if values.is_empty() || partitions < 2 {
        return picked;
    }
    for i in 1..partitions {
        let index = (i * values.len()) / partitions;
        let value = &values[index.min(values.len() - 1)];
        if picked.last() != Some(value) {
            picked.push(value.clone());
        }
    }
    picked
}

fn spi_error(e: pgrx::spi::SpiError) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("planning query failed: {e}"),
        None,
    )
}

/// Boundaries (text form of the key type) and an estimate of the rows.
pub fn boundaries(
    source: &Source,
    column: &str,
    type_name: &str,
    partitions: usize,
) -> (Vec<String>, i64) {
    let quoted = quote_identifier(column);
    if let Source::Relation { oid, .. } = source {
        let stats: Option<(TextArray, Option<f32>)> = Spi::connect(|client| {
            let table = client
                .select(
                    &format!(
                        "SELECT (s.histogram_bounds::text::{type_name}[])::text[], c.reltuples
                         FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                         LEFT JOIN pg_catalog.pg_stats s
                           ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = $2
                         WHERE c.oid = $1"
                    ),
                    None,
                    &[(*oid).into(), column.into()],
                )
                .unwrap_or_else(|e| spi_error(e));
            table.first().get_two::<Vec<Option<String>>, f32>().ok()
        });
        if let Some((Some(histogram), reltuples)) = stats {
            let values: Vec<String> = histogram.into_iter().flatten().collect();
            let total = reltuples.unwrap_or(0.0).max(0.0) as i64;
            if values.len() >= 2 && total > 0 {
                return (pick_evenly(&values, partitions), total);
            }
        }
    }
    // No histogram: the key values themselves, sampled for big tables.
    let (from, scale) = match source {
        Source::Relation {
            oid,
            qualified_name,
            indexable: true,
        } => {
            let reltuples: f64 = Spi::get_one_with_args::<f32>(
                "SELECT reltuples FROM pg_catalog.pg_class WHERE oid = $1",
                &[(*oid).into()],
            )
            .unwrap_or(None)
            .unwrap_or(0.0)
            .max(0.0) as f64;
            if reltuples > SAMPLE_ROWS * 2.0 {
                let percent = (100.0 * SAMPLE_ROWS / reltuples).clamp(0.01, 100.0);
                (
                    format!("{qualified_name} TABLESAMPLE SYSTEM ({percent:.4}) REPEATABLE (0)"),
                    100.0 / percent,
                )
            } else {
                (qualified_name.clone(), 1.0)
            }
        }
        other => (
            format!("{} AS pg_stream_export_source", other.sql_from_item()),
            1.0,
        ),
    };
    let fractions: Vec<String> = (1..partitions)
        .map(|i| format!("{}", i as f64 / partitions as f64))
        .collect();
    let sql = if fractions.is_empty() {
        format!("SELECT NULL::text[], count(*) FROM {from}")
    } else {
        format!(
            "SELECT (percentile_disc(ARRAY[{}]::float8[]) WITHIN GROUP (ORDER BY {quoted}))::text[], count(*) FROM {from}",
            fractions.join(",")
        )
    };
    let result: (TextArray, Option<i64>) = Spi::get_two(&sql).unwrap_or_else(|e| spi_error(e));
    let mut values: Vec<String> = result.0.unwrap_or_default().into_iter().flatten().collect();
    values.dedup();
    let total = (result.1.unwrap_or(0) as f64 * scale) as i64;
    (values, total)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn picks_evenly_without_repeats() {
        let values: Vec<String> = (0..101).map(|i| format!("{i:03}")).collect();
        assert_eq!(pick_evenly(&values, 4), vec!["025", "050", "075"]);
        assert_eq!(pick_evenly(&values, 1), Vec::<String>::new());
        let few: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(pick_evenly(&few, 8), vec!["a", "b"]);
        assert!(pick_evenly(&[], 3).is_empty());
    }
}
