//! The extension's own tables (incremental jobs, archive records), as the
//! run layer reads and writes them through SPI.

use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};

use crate::error::raise;
use crate::ident::quote_identifier;

/// The schema the extension's tables are in, quoted for SQL text.
pub fn catalog_schema(client: &SpiClient<'_>) -> SpiResult<String> {
    let table = client.select(
        "SELECT n.nspname::text FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'pg_stream_export'",
        Some(1),
        &[],
    )?;
    let schema = match table.is_empty() {
        true => None,
        false => table.first().get_one::<String>()?,
    };
    Ok(quote_identifier(&schema.unwrap_or_else(|| "public".into())))
}

/// Errors of our own catalog queries that are not the query's own
/// (PostgreSQL's errors, a lock timeout say, are raised as they are).
pub fn catalog_failed(e: pgrx::spi::SpiError) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pg_stream_export catalog query failed: {e}"),
        None,
    )
}
