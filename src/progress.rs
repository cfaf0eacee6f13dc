//! `pg_stat_progress_copy` reporting: an export shows up like a COPY TO,
//! with rows as tuples_processed and output bytes as bytes_processed.

use pgrx::pg_sys;

/// Reports progress while alive; ends the report when dropped. When the
/// backend already reports another command (an export inside a COPY), it
/// stays silent rather than overwrite that report.
pub struct Progress {
    active: bool,
}

/// How the output leaves the backend, as pg_stat_progress_copy names it.
#[derive(Clone, Copy)]
pub enum Destination {
    File,
    /// Rows returned to the caller of a set-returning function.
    Callback,
    /// COPY TO STDOUT.
    Pipe,
}

impl Progress {
    pub fn start(relation: pg_sys::Oid, destination: Destination) -> Progress {
        // SAFETY: MyBEEntry is this backend's status entry (or NULL before
        // it is set up); the progress calls only write to it.
        unsafe {
            let entry = pg_sys::MyBEEntry;
            if entry.is_null()
                || (*entry).st_progress_command
                    != pg_sys::ProgressCommandType::PROGRESS_COMMAND_INVALID
            {
                return Progress { active: false };
            }
            pg_sys::pgstat_progress_start_command(
                pg_sys::ProgressCommandType::PROGRESS_COMMAND_COPY,
                relation,
            );
            pg_sys::pgstat_progress_update_param(
                pg_sys::PROGRESS_COPY_COMMAND as i32,
                pg_sys::PROGRESS_COPY_COMMAND_TO as i64,
            );
            let kind = match destination {
                Destination::File => pg_sys::PROGRESS_COPY_TYPE_FILE,
                Destination::Callback => pg_sys::PROGRESS_COPY_TYPE_CALLBACK,
                Destination::Pipe => pg_sys::PROGRESS_COPY_TYPE_PIPE,
            };
            pg_sys::pgstat_progress_update_param(pg_sys::PROGRESS_COPY_TYPE as i32, kind as i64);
        }
        Progress { active: true }
    }

    pub fn update(&self, rows: u64, bytes: u64) {
        if !self.active {
            return;
        }
        // SAFETY: we started the report, so the entry is ours to update.
        unsafe {
            pg_sys::pgstat_progress_update_param(
                pg_sys::PROGRESS_COPY_TUPLES_PROCESSED as i32,
                rows as i64,
            );
            pg_sys::pgstat_progress_update_param(
                pg_sys::PROGRESS_COPY_BYTES_PROCESSED as i32,
                bytes as i64,
            );
        }
    }

    pub fn end(&mut self) {
        if std::mem::replace(&mut self.active, false) {
            // SAFETY: ends the report this value started.
            unsafe { pg_sys::pgstat_progress_end_command() };
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // During an abort PostgreSQL ends the report itself.
        // SAFETY: only reads the transaction state.
        if unsafe { pg_sys::IsTransactionState() } {
            self.end();
        }
    }
}
