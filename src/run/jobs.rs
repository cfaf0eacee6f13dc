//! Incremental jobs: a named export of the rows added to a source since
//! the job last ran, into the job's next part file or object, with the
//! job's position advanced in the same transaction that records the part.
//!
//! Exactly once, whatever dies when: part n is named after n alone
//! ([`job_part_name`]) and starts after the position the job's row holds,
//! so a run that died after putting part n in place but before its
//! transaction committed left a complete file under the very name the
//! next run would write. The next run finds it, checks it against its
//! footer and that it continues the job's rows, and records it instead of
//! writing it again ("recovered"); a file that does not check out is
//! replaced. A run that died earlier left at most a `.partial` file or an
//! unfinished upload, which the next write replaces as any export does.
//! The job's row is locked for the run, so two runs of one job take turns.

use pgrx::prelude::*;
use pgrx::spi::{Spi, SpiClient, SpiResult};

use super::catalog::{catalog_failed, catalog_schema};

use super::{Single, Written};
use crate::destination::output::Output;
use crate::destination::ExportDirectory;
use crate::engine::export::Export;
use crate::engine::source::Source;
use crate::error::raise;
use crate::layout::{job_name_problem, job_part_name};
use crate::options::{ExportOptions, RawOptions};
use crate::progress::Destination;
use crate::token::ResumeToken;

/// A job's definition and where it stands, as its catalog row holds them.
struct Job {
    name: String,
    source: String,
    key: String,
    destination: String,
    compression: String,
    compression_level: Option<i32>,
    /// The resume token after the last exported row (`None`: from the
    /// start).
    position: Option<String>,
    parts: i64,
    rows: i64,
}

impl Job {
    fn options(&self) -> ExportOptions {
        options(
            &self.compression,
            self.compression_level,
            &self.key,
            self.position.as_deref(),
        )
    }
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
    /// No row after the job's position: nothing written.
    Nothing,
}

/// Define a job: every part of it is checked now (name, options,
/// destination and its privilege, source and key), then it is recorded as
/// the current role's.
pub fn create(
    name: &str,
    source: &str,
    key: &str,
    destination: &str,
    compression: &str,
    compression_level: Option<i32>,
) {
    if let Some(problem) = job_name_problem(name) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid job name: \"{name}\""),
            Some(problem),
        );
    }
    let options = options(compression, compression_level, key, None);
    drop(ExportDirectory::open(destination));
    drop(Export::open(
        Source::resolve(source),
        options.clone(),
        Destination::File,
    ));
    Spi::connect_mut(|client| {
        let schema = catalog_schema(client)?;
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
                Some(
                    "DELETE FROM stream_export_job WHERE name = ... removes a job (its files stay)",
                ),
            );
        }
        client.update(
            &format!(
                "INSERT INTO {schema}.stream_export_job \
                 (name, source, key, destination, compression, compression_level) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            None,
            &[
                name.into(),
                source.into(),
                key.into(),
                destination.into(),
                options.compression.to_string().into(),
                compression_level.into(),
            ],
        )?;
        Ok(())
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// Lock the job `name` for this transaction and read it: `42704` when
/// there is none this role can see, `42501` when it is another role's (a
/// superuser sees every job, but runs only its own).
fn lock(client: &mut SpiClient<'_>, schema: &str, name: &str) -> SpiResult<Job> {
    let table = client.update(
        &format!(
            "SELECT owner = pg_catalog.quote_ident(current_user)::regrole, owner::text, source, key, destination, \
             compression, compression_level, position, parts, rows \
             FROM {schema}.stream_export_job WHERE name = $1 FOR NO KEY UPDATE"
        ),
        Some(1),
        &[name.into()],
    )?;
    if table.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("job \"{name}\" does not exist"),
            Some("jobs are made with stream_export_job_create(); a role sees only its own"),
        );
    }
    let row = table.first();
    if row.get::<bool>(1)? != Some(true) {
        let owner = row.get::<String>(2)?.unwrap_or_default();
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("job \"{name}\" belongs to role \"{owner}\""),
            Some("a job runs only as its owner, with the owner's privileges: SET ROLE to it first"),
        );
    }
    let text = |n: usize| -> SpiResult<String> { Ok(row.get::<String>(n)?.unwrap_or_default()) };
    Ok(Job {
        name: name.to_owned(),
        source: text(3)?,
        key: text(4)?,
        destination: text(5)?,
        compression: text(6)?,
        compression_level: row.get::<i32>(7)?,
        position: row.get::<String>(8)?,
        parts: row.get::<i64>(9)?.unwrap_or(0),
        rows: row.get::<i64>(10)?.unwrap_or(0),
    })
}

/// Run the job `name` once (see the module's comment).
pub fn increment(name: &str) -> Increment {
    let started = std::time::Instant::now();
    Spi::connect_mut(|client| {
        let schema = catalog_schema(client)?;
        let job = lock(client, &schema, name)?;
        let options = job.options();
        let directory = ExportDirectory::open(&job.destination);
        let number = job.parts + 1;
        let file = job_part_name(&job.name, number, options.compression.file_suffix());
        let (written, recovered) = match recover(&directory, &file, &job) {
            Some(written) => (written, true),
            None => match write_part(&directory, &file, &job, options) {
                Some(written) => (written, false),
                None => {
                    client.update(
                        &format!(
                            "UPDATE {schema}.stream_export_job SET last_run_at = now() \
                             WHERE name = $1"
                        ),
                        None,
                        &[name.into()],
                    )?;
                    return Ok(Increment::Nothing);
                }
            },
        };
        let target = written.path.to_string_lossy().into_owned();
        let resume_token = written.resume_token.clone().unwrap_or_default();
        let elapsed = pgrx::datum::Interval::from_micros(started.elapsed().as_micros() as i64);
        client.update(
            &format!(
                "INSERT INTO {schema}.stream_export_job_part \
                 (job, part, target, rows, bytes, file_bytes, crc32, after_token, resume_token, \
                  recovered, elapsed) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
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
            ],
        )?;
        client.update(
            &format!(
                "UPDATE {schema}.stream_export_job SET position = $2, parts = $3, \
                 rows = rows + $4, last_run_at = now(), last_part_at = now() WHERE name = $1"
            ),
            None,
            &[
                name.into(),
                resume_token.into(),
                number.into(),
                (written.rows as i64).into(),
            ],
        )?;
        Ok(Increment::Part {
            number,
            target,
            rows: written.rows,
            recovered,
        })
    })
    .unwrap_or_else(|e| catalog_failed(e))
}

/// The part `file` a run that died before its commit left in place, if it
/// is whole (it matches its footer) and continues the job: its token
/// counts the job's rows plus its own. Anything else is not taken.
fn recover(directory: &ExportDirectory, file: &str, job: &Job) -> Option<Written> {
    let mut reader = Counted {
        inner: directory.open_file(file).ok()?,
        bytes: 0,
    };
    let verdict = crate::sink::verify::verify(&mut reader, &mut || {
        pgrx::check_for_interrupts!();
    })
    .ok()?;
    let token = verdict.resume_token.filter(|_| verdict.ok)?;
    let decoded = ResumeToken::decode(&token).ok()?;
    if verdict.rows == 0 || decoded.rows != job.rows as u64 + verdict.rows {
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

/// Export the rows after the job's position into `file`, replacing what an
/// earlier run left under that name unrecorded; `None`, and nothing left
/// behind, when there is no such row.
fn write_part(
    directory: &ExportDirectory,
    file: &str,
    job: &Job,
    options: ExportOptions,
) -> Option<Written> {
    let source = Source::resolve(&job.source);
    let output = directory.create_part(file, true);
    // The rows committed by the time this run has its job, not by the time
    // the CALL started: in READ COMMITTED a snapshot taken now (under
    // REPEATABLE READ or SERIALIZABLE this is the transaction's one).
    // SAFETY: pushes the transaction's current snapshot as the active one
    // for the export's queries; popped below. An error before that aborts
    // the transaction, whose cleanup empties the snapshot stack.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let single = Single::open(source, options, Destination::File, &output.describe());
    let (path, counts, resume_token) = single.run(output, |output: Output, counts| {
        (counts.rows > 0).then(|| output.commit())
    });
    // SAFETY: pops the snapshot pushed above; the export's own are popped.
    unsafe { pg_sys::PopActiveSnapshot() };
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
