//! Incremental jobs: a named export of the rows added to a table since
//! the job last ran, into the job's next part file or object, with the
//! job's position advanced in the same transaction that records the part.
//!
//! Exactly once on a live table. Run N takes a snapshot S_N (after the
//! job's row is locked) and the time t_N right after it, and exports in key
//! order, into one part: the rows S_N sees above the position P_{N-1}, and
//! the late rows: keys in (F_{N-1}, P_{N-1}] whose inserting transaction
//! S_{N-1} did not see (they committed after run N-1 looked). It records
//! S_N, t_N, its position P_N and a floor F_N: the position of the latest
//! run r whose t_r is before t_min, the start of the oldest transaction in
//! progress in another backend when the run began (now if none), read
//! before S_N is taken. A key drawn from a sequence by a transaction T that
//! S_N did not see was drawn after T started, so at or after t_min (T was
//! in progress when t_min was read, or began after), so after t_r, so after
//! S_r was taken (t_r is read after S_r): it is greater than every key S_r
//! saw, so greater than F_N. (Strictly before: the clock counts whole
//! microseconds, and a t_r equal to T's start does not order S_r before
//! T's first nextval.) The late-row window (F, P] is bounded and read
//! through the key's index.
//!
//! Run 0. A job is made with one: [`create`] records the token after the
//! largest key its snapshot S_0 sees (P_0, `origin`; NULL for an empty
//! table) and t_0 (`origin_at`), the clock read right after S_0 was taken,
//! and the floor computation counts (t_0, P_0) as a run before part 1. The
//! argument above holds for it as it is: P_0 is the key of a row S_0 saw,
//! so it was drawn before S_0 was taken, and a late key of a transaction
//! that began after t_0 was drawn after it. So when no transaction older
//! than the job is still open, the job's first parts have the floor P_0
//! and their window is what was added since the job was made, not the
//! whole table; while one is (t_min <= t_0), the floor stays "from the
//! start", as for a job without run 0 (one made before 0.4.0). A run 0
//! whose largest key was deleted before part 1 can be above P_1: the
//! window never starts above the position
//! ([`Export::read_job_window`]).
//!
//! A job and its destination are bound to each other by `<job>.job.json`
//! (the job's id, database and server), written by the first run and
//! checked by every run. Part n is named after n alone ([`job_part_name`]),
//! so a run that put part n in place but did not commit (killed, rolled
//! back, a failed COMMIT) left it under the name the next run writes. The
//! next run records it as it is ("recovered") only if it checks against
//! its footer and re-reading its key range now gives the same rows, CRC-32
//! and position; otherwise it writes the part again. The job's row is
//! locked for the run, so two runs of one job take turns.
//!
//! The catalog is written with its owner's rights ([`as_catalog_owner`]);
//! the export runs with the caller's.

use pgrx::prelude::*;
use pgrx::spi::{Spi, SpiClient, SpiResult};
use pgrx::PgXactCallbackEvent;

use super::catalog::{as_catalog_owner, catalog_failed, catalog_schema};

use super::{Single, Written};
use crate::destination::output::Output;
use crate::destination::ExportDirectory;
use crate::engine::export::Export;
use crate::engine::source::Source;
use crate::error::raise;
use crate::layout::{job_binding_name, job_name_problem, job_part_name};
use crate::options::{ExportOptions, RawOptions};
use crate::progress::Destination;
use crate::token::ResumeToken;

/// A job's definition and where it stands, as its catalog row holds them.
struct Job {
    name: String,
    job_id: String,
    source: String,
    key: String,
    key_type: Option<String>,
    destination: String,
    compression: String,
    compression_level: Option<i32>,
    /// The resume token after the last exported key, P (`None`: from the
    /// start).
    position: Option<String>,
    /// The snapshot of the run that wrote the last part (`None` before the
    /// first part, or for parts written before 0.4).
    snapshot: Option<String>,
    /// The floor F of that run, a resume token (`None`: from the start).
    floor: Option<String>,
    /// That run's own transaction id.
    run_xid: Option<u64>,
    /// The ids of that run's subtransactions its snapshot does not list
    /// as seen (see [`own_unlisted_xids`]).
    run_subxids: Vec<u64>,
    parts: i64,
}

/// The options every part of a job is written with: key order, after the
/// job's position, with a footer (so a part can be verified and
/// recovered).
fn options(
    compression: &str,
    compression_level: Option<i32>,
    key: &str,
    after: Option<&str>,
) -> ExportOptions {
    ExportOptions::parse(&RawOptions {
        compression: Some(compression),
        compression_level,
        key: Some(key),
        after,
        footer: Some(true),
        ..Default::default()
    })
    .unwrap_or_else(|e| e.raise())
}

/// What one run of a job did.
pub enum Increment {
    /// Part `number` is in place and recorded.
    Part {
        number: i64,
        target: String,
        rows: u64,
        recovered: bool,
    },
    /// No row to export: nothing written.
    Nothing,
}

/// The current role (SET ROLE included).
fn current_role() -> pg_sys::Oid {
    // SAFETY: reads the backend's current user id.
    unsafe { pg_sys::GetUserId() }
}

fn check_name(name: &str) {
    if let Some(problem) = job_name_problem(name) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid job name: \"{name}\""),
            Some(problem),
        );
    }
}

/// The table a job reads: `source` must name a plain or partitioned table
/// (`0A000` for anything else: a view or a query has no rows of its own
/// whose inserting transaction could be told).
fn job_table(source: &str) -> Source {
    let resolved = Source::resolve(source);
    let relkind = match &resolved {
        // SAFETY: a catalog lookup by OID.
        Source::Relation { oid, .. } => (unsafe { pg_sys::get_rel_relkind(*oid) }) as u8,
        _ => 0,
    };
    if !matches!(relkind, b'r' | b'p') {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("the source of an incremental job must be a table: \"{source}\" is not"),
            Some("a job exports each row of a plain or partitioned table exactly once; for a view or a query, export with stream_export_to_file(..., key => ..., after => ...)"),
        );
    }
    resolved
}

/// The SQL type of `column` of the table `source` (`format_type`).
fn key_type_of(source: &Source, column: &str) -> String {
    crate::engine::scan::select_one::<String>(
        "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute \
         WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        &[source.relation_oid().into(), column.into()],
    )
    .unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" does not exist in the export source"),
            Some("key names a column of the source exactly, case included"),
        )
    })
}

/// Define a job: every part of it is checked now (name, options,
/// destination and its privilege, source and key), then it is recorded as
/// the current role's, with its key's type and a new random id.
pub fn create(
    name: &str,
    source: &str,
    key: &str,
    destination: &str,
    compression: &str,
    compression_level: Option<i32>,
) {
    check_name(name);
    let options = options(compression, compression_level, key, None);
    drop(ExportDirectory::open(destination));
    let table = job_table(source);
    let export = Export::open(table.clone(), options.clone(), Destination::File);
    // Run 0 (see the module's comment): the largest key a snapshot taken
    // now sees, and the clock read right after that snapshot was taken.
    // SAFETY: pushes the transaction's current snapshot (in READ COMMITTED
    // a new one) as the active one for the lookup; popped below. An error
    // before that aborts the transaction, whose cleanup empties the
    // snapshot stack.
    let origin_at = unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::GetCurrentTimestamp()
    };
    let origin = export.largest_key_token();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    drop(export);
    let key_type = key_type_of(&table, key);
    let owner = current_role();
    Spi::connect_mut(|client| {
        let schema = catalog_schema(client)?;
        as_catalog_owner(client, &schema, |client| {
            let taken = !client
                .select(
                    &format!("SELECT FROM {schema}.stream_export_job WHERE name = $1"),
                    Some(1),
                    &[name.into()],
                )?
                .is_empty();
            if taken {
                raise(
                    PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                    format!("job \"{name}\" already exists"),
                    Some("SELECT stream_export_job_drop(name) removes a job (its files stay)"),
                );
            }
            client.update(
                &format!(
                    "INSERT INTO {schema}.stream_export_job \
                     (name, owner, source, key, destination, compression, compression_level, key_type, \
                      origin, origin_at) \
                     VALUES ($1, $2::pg_catalog.oid::pg_catalog.regrole, $3, $4, $5, $6, $7, $8, $9, \
                             '2000-01-01 00:00:00+00'::pg_catalog.timestamptz \
                             + $10::pg_catalog.int8 * interval '1 microsecond')"
                ),
                None,
                &[
                    name.into(),
                    owner.into(),
                    source.into(),
                    key.into(),
                    destination.into(),
                    options.compression.to_string().into(),
                    compression_level.into(),
                    key_type.into(),
                    origin.into(),
                    origin_at.into(),
                ],
            )?;
            Ok(())
        })
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// Remove the job `name` and its history (its files stay): its owner or a
/// superuser.
pub fn drop_job(name: &str) {
    let caller = current_role();
    Spi::connect_mut(|client| {
        let schema = catalog_schema(client)?;
        as_catalog_owner(client, &schema, |client| {
            owner_of(client, &schema, name, caller, false)?;
            client.update(
                &format!("DELETE FROM {schema}.stream_export_job WHERE name = $1"),
                None,
                &[name.into()],
            )?;
            Ok(())
        })
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// The schema of the extension's catalog, when the extension is
/// installed in this database.
fn installed_schema(client: &SpiClient<'_>) -> SpiResult<Option<String>> {
    let installed = !client
        .select(
            "SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_stream_export'",
            Some(1),
            &[],
        )?
        .is_empty();
    match installed {
        true => catalog_schema(client).map(Some),
        false => Ok(None),
    }
}

/// Before `DROP ROLE`: `2BP01` when one of `roles` owns jobs in this
/// database (a role's jobs in other databases are not seen from here).
pub fn refuse_dropping_owners(roles: &[pg_sys::Oid]) {
    with_jobs_of(roles, |c, schema| {
        let table = c.select(
                &format!(
                    "SELECT owner::text, pg_catalog.string_agg(pg_catalog.quote_ident(name), ', ' ORDER BY name) \
                     FROM {schema}.stream_export_job WHERE owner::pg_catalog.oid = ANY ($1) \
                     GROUP BY owner ORDER BY 1 LIMIT 1"
                ),
                Some(1),
                &[roles.to_vec().into()],
            )?;
        if table.is_empty() {
            return Ok(());
        }
        let row = table.first();
        let owner = row.get::<String>(1)?.unwrap_or_default();
        let jobs = row.get::<String>(2)?.unwrap_or_default();
        let database: String =
            crate::engine::scan::select_one("SELECT pg_catalog.current_database()::text", &[])
                .unwrap_or_default();
        raise(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "role {owner} cannot be dropped because it owns incremental jobs in database \"{database}\": {jobs}"
                ),
                Some("DROP OWNED BY the role removes its jobs (their files stay); REASSIGN OWNED BY the role TO another gives them to that role"),
            );
    })
}

/// After `DROP OWNED BY`: the roles' jobs in this database go (their files
/// stay).
pub fn drop_jobs_of(roles: &[pg_sys::Oid]) {
    change_owned_jobs(roles, None);
}

/// After `REASSIGN OWNED BY ... TO to`: the roles' jobs are `to`'s.
pub fn reassign_jobs(roles: &[pg_sys::Oid], to: pg_sys::Oid) {
    change_owned_jobs(roles, Some(to));
}

fn change_owned_jobs(roles: &[pg_sys::Oid], to: Option<pg_sys::Oid>) {
    with_jobs_of(roles, |c, schema| {
        match to {
                None => c.update(
                    &format!(
                        "DELETE FROM {schema}.stream_export_job WHERE owner::pg_catalog.oid = ANY ($1)"
                    ),
                    None,
                    &[roles.to_vec().into()],
                ),
                Some(to) => c.update(
                    &format!(
                        "UPDATE {schema}.stream_export_job SET owner = $2::pg_catalog.oid::pg_catalog.regrole \
                         WHERE owner::pg_catalog.oid = ANY ($1)"
                    ),
                    None,
                    &[roles.to_vec().into(), to.into()],
                ),
            }
            .map(|_| ())
    })
}

/// Run `f` on the job catalog as its owner, for the role statements of
/// `roles`; nothing when there is no role or the extension is not
/// installed in this database.
fn with_jobs_of(roles: &[pg_sys::Oid], f: impl FnOnce(&mut SpiClient<'_>, &str) -> SpiResult<()>) {
    if roles.is_empty() {
        return;
    }
    Spi::connect_mut(|client| {
        let Some(schema) = installed_schema(client)? else {
            return Ok(());
        };
        as_catalog_owner(client, &schema, |c| f(c, &schema))
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// Check that `caller` may act on the job `name` (lock its row first when
/// `lock`): `42704` when there is none, or it is another role's and the
/// caller is no superuser (it does not see it); `42501` for a superuser
/// running another role's job; a job whose owner is gone is only for a
/// superuser to remove. Returns the owner.
fn owner_of(
    client: &mut SpiClient<'_>,
    schema: &str,
    name: &str,
    caller: pg_sys::Oid,
    running: bool,
) -> SpiResult<pg_sys::Oid> {
    let table = client.select(
        &format!(
            "SELECT owner::pg_catalog.oid, owner::text, \
             EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = owner::pg_catalog.oid) \
             FROM {schema}.stream_export_job WHERE name = $1"
        ),
        Some(1),
        &[name.into()],
    )?;
    // SAFETY: a catalog lookup by role OID.
    let superuser = unsafe { pg_sys::superuser_arg(caller) };
    let not_found = || -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("job \"{name}\" does not exist"),
            Some("jobs are made with stream_export_job_create(); a role sees only its own"),
        )
    };
    if table.is_empty() {
        not_found();
    }
    let row = table.first();
    let owner = row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid);
    if owner == caller {
        return Ok(owner);
    }
    if !superuser {
        not_found();
    }
    let owner_name = row.get::<String>(2)?.unwrap_or_default();
    if row.get::<bool>(3)? != Some(true) {
        if !running {
            return Ok(owner);
        }
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("job \"{name}\" belongs to role {owner_name}, which no longer exists"),
            Some("nobody can run it: a superuser removes it with SELECT stream_export_job_drop(name)"),
        );
    }
    if running {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("job \"{name}\" belongs to role \"{owner_name}\""),
            Some("a job runs only as its owner, with the owner's privileges: SET ROLE to it first"),
        );
    }
    Ok(owner)
}

/// Lock the job `name` for this transaction and read it (see [`owner_of`]).
fn lock(
    client: &mut SpiClient<'_>,
    schema: &str,
    name: &str,
    caller: pg_sys::Oid,
) -> SpiResult<Job> {
    owner_of(client, schema, name, caller, true)?;
    let table = client.update(
        &format!(
            "SELECT job_id, source, key, key_type, destination, compression, compression_level, \
             position, snapshot, floor, run_xid::text, parts, \
             pg_catalog.array_to_string(run_subxids, ',') \
             FROM {schema}.stream_export_job WHERE name = $1 FOR NO KEY UPDATE"
        ),
        Some(1),
        &[name.into()],
    )?;
    if table.is_empty() {
        // Removed while this run waited for it.
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("job \"{name}\" does not exist"),
            None,
        );
    }
    let row = table.first();
    let text = |n: usize| -> SpiResult<String> { Ok(row.get::<String>(n)?.unwrap_or_default()) };
    Ok(Job {
        name: name.to_owned(),
        job_id: text(1)?,
        source: text(2)?,
        key: text(3)?,
        key_type: row.get::<String>(4)?,
        destination: text(5)?,
        compression: text(6)?,
        compression_level: row.get::<i32>(7)?,
        position: row.get::<String>(8)?,
        snapshot: row.get::<String>(9)?,
        floor: row.get::<String>(10)?,
        run_xid: row.get::<String>(11)?.and_then(|x| x.parse().ok()),
        parts: row.get::<i64>(12)?.unwrap_or(0),
        run_subxids: row
            .get::<String>(13)?
            .unwrap_or_default()
            .split(',')
            .filter_map(|x| x.parse().ok())
            .collect(),
    })
}

/// The identity a job's destination is bound to.
fn binding(job: &Job) -> serde_json::Value {
    // SAFETY: reads the server's system identifier, fixed at initdb.
    let system = unsafe { pg_sys::GetSystemIdentifier() };
    let database: String =
        crate::engine::scan::select_one("SELECT pg_catalog.current_database()::text", &[])
            .unwrap_or_default();
    serde_json::json!({
        "pg_stream_export_job": 1,
        "job": job.name,
        "job_id": job.job_id,
        "database": database,
        "system_identifier": system.to_string(),
    })
}

/// Check that `directory` is this job's (its binding names this job, this
/// database and this server), binding it at the first run: `55000` naming
/// the owner when it belongs to another job or database, before anything
/// is written.
fn check_binding(directory: &ExportDirectory, job: &Job) {
    let name = job_binding_name(&job.name);
    let ours = binding(job);
    let found = match directory.read_small(&name) {
        Some(bytes) => bytes,
        None => {
            directory.write_small(&name, (ours.to_string() + "\n").as_bytes());
            return;
        }
    };
    let theirs: Option<serde_json::Value> = serde_json::from_slice(&found).ok();
    let field = |key: &str| -> String {
        theirs
            .as_ref()
            .and_then(|v| v.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    let same = ["job_id", "database", "system_identifier"]
        .iter()
        .all(|key| ours.get(*key).and_then(|v| v.as_str()) == Some(field(key).as_str()));
    if !same {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the destination of job \"{}\" belongs to job \"{}\" (id {}) of database \"{}\" on the server with system identifier {}",
                job.name,
                field("job"),
                field("job_id"),
                field("database"),
                field("system_identifier")
            ),
            Some("each job writes into a destination of its own (its binding is the file or object \"<job>.job.json\" there): give this job another destination, or remove the other job's files if that job is gone"),
        );
    }
}

/// Export run N's rows (see the module's comment) as of the active
/// snapshot, into nothing but counters when `through` is given (a
/// leftover part's last key, to check it against).
fn job_export(job: &Job, table: &Source, plain: bool, through: Option<&str>) -> Export {
    let options = match plain {
        true => options("none", None, &job.key, job.position.as_deref()),
        false => options(
            &job.compression,
            job.compression_level,
            &job.key,
            job.position.as_deref(),
        ),
    };
    let mut export = Export::open(table.clone(), options, Destination::File);
    if let Some(snapshot) = &job.snapshot {
        let floor = job.floor.as_deref().map(|token| {
            ResumeToken::decode(token)
                .ok()
                .and_then(|t| t.last_key)
                .unwrap_or_else(|| {
                    raise(
                        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                        format!("job \"{}\": its recorded floor is not a key token", job.name),
                        Some("the job's catalog row was changed outside pg_stream_export's functions"),
                    )
                })
        });
        export.read_job_window(floor.as_deref(), snapshot, job.run_xid, &job.run_subxids);
    }
    if let Some(key) = through {
        export.read_through(key);
    }
    export
}

/// Run the job `name` once (see the module's comment).
pub fn increment(name: &str) -> Increment {
    let started = std::time::Instant::now();
    let caller = current_role();
    // SAFETY: reads the transaction's isolation level.
    let per_statement = unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32;
    if !per_statement {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "CALL stream_export_increment runs only in a READ COMMITTED transaction",
            Some("a run takes its snapshot after it has its job; under REPEATABLE READ or SERIALIZABLE the transaction's snapshot is older than that"),
        );
    }
    Spi::connect_mut(|client| {
        let schema = catalog_schema(client)?;
        let mut job = as_catalog_owner(client, &schema, |c| lock(c, &schema, name, caller))?;
        check_name(&job.name);
        let table = job_table(&job.source);
        let key_type = key_type_of(&table, &job.key);
        match &job.key_type {
            Some(recorded) if *recorded != key_type => raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "job \"{name}\": key column \"{}\" is of type {key_type} now, but the job was made for type {recorded}",
                    job.key
                ),
                Some("the job's position is a key of the old type: drop the job (stream_export_job_drop) and make it again, with a new destination"),
            ),
            Some(_) => {}
            None => {
                // A job made before 0.4: its key's type is recorded now.
                as_catalog_owner(client, &schema, |c| {
                    c.update(
                        &format!("UPDATE {schema}.stream_export_job SET key_type = $2 WHERE name = $1"),
                        None,
                        &[name.into(), key_type.clone().into()],
                    )
                    .map(|_| ())
                })?;
                job.key_type = Some(key_type);
            }
        }
        let directory = ExportDirectory::open(&job.destination);
        check_binding(&directory, &job);
        let number = job.parts + 1;
        let suffix = options(&job.compression, job.compression_level, &job.key, None)
            .compression
            .file_suffix();
        let file = job_part_name(&job.name, number, suffix);

        // The start of the oldest transaction in progress elsewhere, read
        // before this run's snapshot is taken (now, when there is none).
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let horizon = crate::compat::oldest_other_transaction_start().map_or(now, |t| t.min(now));

        // The rows committed by the time this run has its job, not by the
        // time the CALL started: in READ COMMITTED a snapshot taken now.
        // SAFETY: pushes the transaction's current snapshot as the active
        // one for the export's queries; popped below. An error before that
        // aborts the transaction, whose cleanup empties the snapshot stack.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let (snapshot, taken_at) = crate::engine::scan::select_first_row(
            "SELECT pg_catalog.pg_current_snapshot()::text, pg_catalog.clock_timestamp()",
            &[],
            |row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<pgrx::datum::TimestampWithTimeZone>(2)?,
                ))
            },
        )
        .unwrap_or_else(|| catalog_failed(pgrx::spi::SpiError::NoTupleTable));
        let outcome = match recover(&directory, &file, &job, &table) {
            Some(written) => Some((written, true)),
            None => write_part(&directory, &file, &job, &table).map(|w| (w, false)),
        };
        // SAFETY: pops the snapshot pushed above; the export's own are popped.
        unsafe { pg_sys::PopActiveSnapshot() };

        let Some((written, recovered)) = outcome else {
            // A part an earlier run left under this name unrecorded holds
            // rows that are not there now: it goes.
            directory.remove_file(&file);
            as_catalog_owner(client, &schema, |c| {
                c.update(
                    &format!(
                        "UPDATE {schema}.stream_export_job SET last_run_at = now() WHERE name = $1"
                    ),
                    None,
                    &[name.into()],
                )
                .map(|_| ())
            })?;
            return Ok(Increment::Nothing);
        };
        let target = written.path.to_string_lossy().into_owned();
        let resume_token = written.resume_token.clone().unwrap_or_default();
        let subxids = own_unlisted_xids(&snapshot);
        let elapsed = pgrx::datum::Interval::from_micros(started.elapsed().as_micros() as i64);
        as_catalog_owner(client, &schema, |c| {
            // F_N: the position of the latest run whose snapshot was taken
            // before the horizon (this run's never is), run 0 included (the
            // job's creation, "part 0"; NULL position: an empty table).
            let horizon_at = "('2000-01-01 00:00:00+00'::pg_catalog.timestamptz \
                              + $2::pg_catalog.int8 * interval '1 microsecond')";
            let floor = c
                .select(
                    &format!(
                        "SELECT token FROM ( \
                             SELECT part, resume_token FROM {schema}.stream_export_job_part \
                             WHERE job = $1 AND coalesce(snapshot_at, finished_at) < {horizon_at} \
                             UNION ALL \
                             SELECT 0, origin FROM {schema}.stream_export_job \
                             WHERE name = $1 AND origin_at < {horizon_at} \
                         ) AS runs (part, token) ORDER BY part DESC LIMIT 1",
                    ),
                    Some(1),
                    &[name.into(), horizon.into()],
                )?
                .first()
                .get_one::<String>()
                .unwrap_or(None);
            c.update(
                &format!(
                    "INSERT INTO {schema}.stream_export_job_part \
                     (job, part, target, rows, bytes, file_bytes, crc32, after_token, resume_token, \
                      recovered, elapsed, snapshot, snapshot_at, floor, run_xid) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                             pg_catalog.pg_current_xact_id())"
                ),
                None,
                &[
                    name.into(),
                    number.into(),
                    target.clone().into(),
                    (written.rows as i64).into(),
                    (written.bytes as i64).into(),
                    (written.file_bytes as i64).into(),
                    format!("{:08x}", written.crc32).into(),
                    job.position.clone().into(),
                    resume_token.clone().into(),
                    recovered.into(),
                    elapsed.into(),
                    snapshot.clone().into(),
                    taken_at.into(),
                    floor.clone().into(),
                ],
            )?;
            c.update(
                &format!(
                    "UPDATE {schema}.stream_export_job SET position = $2, parts = $3, \
                     rows = rows + $4, last_run_at = now(), last_part_at = now(), \
                     snapshot = $5, floor = $6, run_xid = pg_catalog.pg_current_xact_id(), \
                     run_subxids = pg_catalog.string_to_array($7, ',')::pg_catalog.xid8[] \
                     WHERE name = $1"
                ),
                None,
                &[
                    name.into(),
                    resume_token.into(),
                    number.into(),
                    (written.rows as i64).into(),
                    snapshot.into(),
                    floor.into(),
                    subxids
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                        .into(),
                ],
            )
            .map(|_| ())
        })?;
        refuse_inserts_after_the_run(&job.name, &table);
        Ok(Increment::Part {
            number,
            target,
            rows: written.rows,
            recovered,
        })
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// Rows this transaction inserted into `relation` so far (with its
/// subtransactions', aborted ones included): the counts the statistics
/// system keeps for `pg_stat_xact_user_tables`.
fn inserted_in_this_transaction(relation: pg_sys::Oid) -> i64 {
    // SAFETY: the built-in function of one oid argument, called through
    // the function manager as SQL calls it; it reads this backend's
    // pending counts only.
    unsafe {
        pg_sys::OidFunctionCall1Coll(
            pg_sys::Oid::from(pg_sys::F_PG_STAT_GET_XACT_TUPLES_INSERTED),
            pg_sys::InvalidOid,
            pg_sys::Datum::from(relation),
        )
        .value() as i64
    }
}

/// The run's own transaction must not insert into the job's table after
/// the run: the next run counts every row of this transaction as seen by
/// this one, so such a row with a key at or below the position (drawn
/// before the CALL) would never be exported. Checked when the transaction
/// commits (or is prepared), from the insert counts of the table's leaf
/// relations now and then; a COMMIT that would lose rows fails (`25000`)
/// and the transaction rolls back.
fn refuse_inserts_after_the_run(job: &str, table: &Source) {
    // The table, its partitions and its inheritance children, at any depth
    // (a partitioned table's own count stays 0).
    let relations: Vec<pg_sys::Oid> = crate::engine::scan::select_one::<Vec<pg_sys::Oid>>(
        "WITH RECURSIVE tree (relid) AS ( \
             SELECT $1::pg_catalog.oid \
             UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.relid) \
         SELECT pg_catalog.array_agg(relid) FROM tree",
        &[table.relation_oid().into()],
    )
    .unwrap_or_default();
    let counted: Vec<(pg_sys::Oid, i64)> = relations
        .into_iter()
        .map(|r| (r, inserted_in_this_transaction(r)))
        .collect();
    // SAFETY: read this transaction's ids (the run wrote the catalog, so
    // both the top transaction and the CALL's level have one).
    let (xid, run_level) = unsafe {
        (
            pg_sys::GetTopTransactionIdIfAny(),
            pg_sys::GetCurrentTransactionIdIfAny(),
        )
    };
    let (job, shown) = (job.to_owned(), table.description());
    let check = move || {
        // A callback left by a prepared transaction may fire in the next;
        // a run rolled back to a savepoint recorded nothing to protect.
        // SAFETY: questions about this backend's own transaction state.
        let relevant = unsafe {
            pg_sys::GetTopTransactionIdIfAny() == xid
                && pg_sys::TransactionIdIsCurrentTransactionId(run_level)
        };
        if !relevant {
            return;
        }
        if counted
            .iter()
            .any(|&(relation, before)| inserted_in_this_transaction(relation) > before)
        {
            crate::error::raise_with_fields(
                PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
                crate::error::ErrorFields {
                    message: format!(
                        "job \"{job}\": this transaction inserted into {shown} after CALL stream_export_increment"
                    ),
                    detail: Some("The next run counts every row of the run's own transaction as exported, so rows it inserts after the run would be lost; the transaction is rolled back.".into()),
                    hint: Some("Run CALL stream_export_increment last in its transaction, or in a transaction of its own.".into()),
                    context: None,
                },
            );
        }
    };
    pgrx::register_xact_callback(PgXactCallbackEvent::PreCommit, check.clone());
    pgrx::register_xact_callback(PgXactCallbackEvent::PrePrepare, check);
}

/// The ids of this transaction (its subtransactions') at or above the
/// xmax of `snapshot`, the run's: a snapshot lists none of its own
/// transaction's ids as in progress, but those it counts as not yet begun,
/// so the next run would take the rows this run's transaction wrote
/// in savepoints before the CALL (and this run exported) for late rows.
/// Found by asking, for every id assigned since that xmax, whether it is
/// one of this transaction's; the ids since then are few, and each answer
/// is a lookup in this backend's memory.
fn own_unlisted_xids(snapshot: &str) -> Vec<u64> {
    let Some(xmax) = crate::engine::export::snapshot_xmax(snapshot) else {
        return Vec::new();
    };
    // SAFETY: reads the shared next transaction id (under its lock).
    let next = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    let mut own = Vec::new();
    for (checked, full) in (xmax..next).enumerate() {
        if checked % (1 << 20) == (1 << 20) - 1 {
            pgrx::check_for_interrupts!();
        }
        // SAFETY: a question about this backend's own transaction state;
        // any 32-bit id may be asked (the low half of a full id).
        if unsafe {
            pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from_inner(
                full as u32,
            ))
        } {
            own.push(full);
        }
    }
    own
}

/// The part `file` a run that did not commit left in place, if it is
/// whole (it matches its footer) and holds exactly what this run reads
/// now up to its last key: the same rows, CRC-32 and position. Anything
/// else is not taken (and is replaced).
fn recover(directory: &ExportDirectory, file: &str, job: &Job, table: &Source) -> Option<Written> {
    let mut reader = Counted {
        inner: directory.open_file(file).ok()?,
        bytes: 0,
    };
    let verdict = crate::sink::verify::verify(&mut reader, &mut || {
        pgrx::check_for_interrupts!();
    })
    .ok()?;
    let token = verdict.resume_token.clone().filter(|_| verdict.ok)?;
    let last_key = ResumeToken::decode(&token).ok()?.last_key?;
    if verdict.rows == 0 {
        return None;
    }
    // Its key range, read again now (as a part without compression: the
    // CRC-32 covers the uncompressed lines).
    let mut export = job_export(job, table, true, Some(&last_key));
    let (_, counts) = super::pump(&mut export, std::io::sink(), u64::MAX);
    let same = counts.rows == verdict.rows
        && counts.crc32 == verdict.crc32
        && export.resume_token().as_deref() == Some(token.as_str());
    if !same {
        return None;
    }
    let path = match &directory {
        ExportDirectory::Server(dir) => dir.path().join(file),
        ExportDirectory::Prefix(prefix) => prefix.uri.join(file).to_string().into(),
    };
    Some(Written {
        path,
        rows: verdict.rows,
        bytes: verdict.bytes,
        file_bytes: reader.bytes,
        crc32: verdict.crc32,
        resume_token: Some(token),
    })
}

/// Export run N's rows into `file`, replacing what an earlier run left
/// under that name unrecorded; `None`, and nothing left behind, when there
/// is no such row.
fn write_part(
    directory: &ExportDirectory,
    file: &str,
    job: &Job,
    table: &Source,
) -> Option<Written> {
    let export = job_export(job, table, false, None);
    let output = directory.create_part(file, true);
    let single = Single::of(export, &output.describe());
    let (path, counts, resume_token) = single.run(output, |output: Output, counts| {
        (counts.rows > 0).then(|| output.commit())
    });
    Some(super::written(path?, counts, resume_token))
}

/// A reader that counts the bytes read through it.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}
