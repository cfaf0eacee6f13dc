//! Partition planning: boundaries that split a key's range into ranges of
//! about equal row counts, from pg_stats when the key has a histogram, else
//! from the key values themselves (a sample for large tables).

use crate::engine::source::Source;
use crate::ident::quote_identifier;

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

/// Boundaries (text form of the key type) and an estimate of the rows:
/// `partitions - 1` of them whenever the key has that many distinct values
/// (fewer only when it has not). The text is rendered under fixed settings
/// (see [`crate::gucs::with_key_text_settings`]), so that any session reads
/// the bounds back as the same values; the source's names resolve on the
/// session's search_path, as the export's own queries do.
pub fn boundaries(
    source: &Source,
    column: &str,
    type_name: &str,
    partitions: usize,
) -> (Vec<String>, i64) {
    crate::gucs::with_key_text_settings_on_search_path(|| {
        boundaries_inner(source, column, type_name, partitions)
    })
}

fn boundaries_inner(
    source: &Source,
    column: &str,
    type_name: &str,
    partitions: usize,
) -> (Vec<String>, i64) {
    let quoted = quote_identifier(column);
    if let Source::Relation { oid, .. } = source {
        let stats: (TextArray, Option<f32>) = crate::engine::scan::select_first_row(
            &format!(
                "SELECT (s.histogram_bounds::text::{type_name}[])::text[], c.reltuples
                 FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_catalog.pg_stats s
                   ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = $2
                 WHERE c.oid = $1"
            ),
            &[(*oid).into(), column.into()],
            |row| Ok((row.get::<Vec<Option<String>>>(1)?, row.get::<f32>(2)?)),
        )
        .unwrap_or((None, None));
        if let (Some(histogram), reltuples) = stats {
            let values: Vec<String> = histogram.into_iter().flatten().collect();
            let total = reltuples.unwrap_or(0.0).max(0.0) as i64;
            let picked = pick_evenly(&values, partitions);
            // A histogram coarser than the partitions asked for is not
            // enough: the key values themselves are.
            if total > 0 && picked.len() + 1 == partitions {
                return (picked, total);
            }
        }
    }
    // The key values themselves, sampled for big tables.
    let (from, scale) = match source {
        Source::Relation {
            oid,
            qualified_name,
            indexable: true,
        } => {
            let reltuples: f64 = crate::engine::scan::select_one::<f32>(
                "SELECT reltuples FROM pg_catalog.pg_class WHERE oid = $1",
                &[(*oid).into()],
            )
            .unwrap_or(0.0)
            .max(0.0) as f64;
            let sample_rows = SAMPLE_ROWS.max(partitions as f64 * 20.0);
            if reltuples > sample_rows * 2.0 {
                let percent = (100.0 * sample_rows / reltuples).clamp(0.0001, 100.0);
                (
                    Some(format!(
                        "{qualified_name} TABLESAMPLE SYSTEM ({percent:.4}) REPEATABLE (0)"
                    )),
                    100.0 / percent,
                )
            } else {
                (None, 1.0)
            }
        }
        _ => (None, 1.0),
    };
    let whole = match source {
        Source::Relation { qualified_name, .. } => qualified_name.clone(),
        other => format!("{} AS pg_stream_export_source", other.sql_from_item()),
    };
    if let Some(sample) = from {
        let (values, count) = percentiles(&sample, &quoted, partitions);
        if values.len() + 1 == partitions {
            return (values, (count as f64 * scale) as i64);
        }
        // The sample had too few distinct keys: read them all.
    }
    percentiles(&whole, &quoted, partitions)
}

/// `partitions - 1` evenly spaced key values of `from` (without repeats)
/// and its row count.
fn percentiles(from: &str, quoted_key: &str, partitions: usize) -> (Vec<String>, i64) {
    let fractions: Vec<String> = (1..partitions)
        .map(|i| format!("{}", i as f64 / partitions as f64))
        .collect();
    let sql = if fractions.is_empty() {
        format!("SELECT NULL::text[], count(*) FROM {from}")
    } else {
        format!(
            "SELECT (percentile_disc(ARRAY[{}]::float8[]) WITHIN GROUP (ORDER BY {quoted_key}))::text[], count(*) FROM {from}",
            fractions.join(",")
        )
    };
    let result: (TextArray, Option<i64>) =
        crate::engine::scan::select_first_row(&sql, &[], |row| Ok((row.get(1)?, row.get(2)?)))
            .unwrap_or((None, None));
    let mut values: Vec<String> = result.0.unwrap_or_default().into_iter().flatten().collect();
    values.dedup();
    (values, result.1.unwrap_or(0))
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
