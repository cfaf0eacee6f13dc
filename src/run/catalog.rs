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

/// The role that owns the extension's job catalog (the role that created
/// the extension): the functions write the catalog with its rights, and
/// nobody else may.
fn catalog_owner(client: &SpiClient<'_>, schema: &str) -> SpiResult<pg_sys::Oid> {
    let table = client.select(
        "SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1::regclass",
        Some(1),
        &[format!("{schema}.stream_export_job").into()],
    )?;
    let owner = match table.is_empty() {
        true => None,
        false => table.first().get_one::<pg_sys::Oid>()?,
    };
    Ok(owner.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            "the table stream_export_job of pg_stream_export is missing",
            Some("ALTER EXTENSION pg_stream_export UPDATE, or create the extension again"),
        )
    }))
}

/// Run `f` (catalog statements only) as the catalog's owner, as
/// PostgreSQL's foreign-key triggers do: the user id is switched with a
/// local, restricted security context and switched back when `f` returns
/// or unwinds (an error's transaction abort also restores it). The export
/// itself never runs in here: it keeps the caller's rights.
pub fn as_catalog_owner<T>(
    client: &mut SpiClient<'_>,
    schema: &str,
    f: impl FnOnce(&mut SpiClient<'_>) -> SpiResult<T>,
) -> SpiResult<T> {
    let owner = catalog_owner(client, schema)?;
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the user id and context saved below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: reads and sets the backend's current user id and security
    // context; `Restore` puts the saved ones back on every way out.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        Restore(user, context)
    };
    f(client)
}
