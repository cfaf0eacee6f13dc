//! Server files: who may write them, where, and how (a `.partial` file,
//! created exclusively, flushed and renamed into place at the end; removed
//! on any failure).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};

use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PgSqlErrorCode};

use crate::error::raise;

/// `pg_stream_export.allowed_directory`: when set, server files must lie
/// inside it. Only superusers can change it.
pub static ALLOWED_DIRECTORY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

pub fn define_gucs() {
    GucRegistry::define_string_guc(
        c"pg_stream_export.allowed_directory",
        c"Directory that server-side export files must be inside (empty: no restriction).",
        c"When set, stream_export_to_file and COPY ... TO 'file' WITH (FORMAT ndjson) only write files inside this directory, after resolving '..' and symbolic links.",
        &ALLOWED_DIRECTORY,
        GucContext::Suset,
        GucFlags::default(),
    );
}

fn insufficient(message: impl Into<String>, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        message,
        Some(hint),
    )
}

/// Superuser, or a member of `role` (a predefined role's OID).
fn is_superuser_or_member_of(role: u32) -> bool {
    // SAFETY: plain role checks for the current user.
    unsafe {
        pg_sys::superuser()
            || pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role))
    }
}

/// Writing a server file needs what COPY TO 'file' needs.
pub fn check_write_privilege() {
    if !is_superuser_or_member_of(pg_sys::ROLE_PG_WRITE_SERVER_FILES) {
        insufficient(
            "permission denied to write a server file",
            "Only superusers and members of pg_write_server_files can export to a server file; others can use stream_export_bytes or COPY ... TO STDOUT.",
        );
    }
}

/// Reading a server file needs what COPY FROM 'file' needs.
pub fn check_read_privilege() {
    if !is_superuser_or_member_of(pg_sys::ROLE_PG_READ_SERVER_FILES) {
        insufficient(
            "permission denied to read a server file",
            "Only superusers and members of pg_read_server_files can verify a server file.",
        );
    }
}

/// A server path must be absolute (`42501` otherwise), as for COPY.
pub fn require_absolute(path: &str) {
    if !Path::new(path).is_absolute() {
        insufficient(
            format!("relative path \"{path}\" is not allowed"),
            "give an absolute path on the database server",
        );
    }
}

/// Check `path` and return it with its directory resolved: absolute,
/// naming a file in an existing directory, and inside
/// `pg_stream_export.allowed_directory` when that is set.
pub fn resolve_target(path: &str) -> PathBuf {
    require_absolute(path);
    let given = Path::new(path);
    let Some(Component::Normal(file_name)) = given.components().next_back() else {
        insufficient(
            format!("path \"{path}\" does not name a file"),
            "give an absolute path to a file",
        );
    };
    let parent = given.parent().unwrap_or(Path::new("/"));
    let directory = match parent.canonicalize() {
        Ok(dir) => dir,
        Err(e) => raise(
            match e.kind() {
                io::ErrorKind::NotFound => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
                io::ErrorKind::PermissionDenied => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                _ => PgSqlErrorCode::ERRCODE_IO_ERROR,
            },
            format!("could not open directory \"{}\": {e}", parent.display()),
            None,
        ),
    };
    if let Some(allowed) = ALLOWED_DIRECTORY.get() {
        let allowed = allowed.to_string_lossy().into_owned();
        if !allowed.is_empty() {
            let inside = Path::new(&allowed)
                .canonicalize()
                .is_ok_and(|root| directory.starts_with(&root));
            if !inside {
                insufficient(
                    format!("path \"{path}\" is outside pg_stream_export.allowed_directory"),
                    &format!("export files must be inside \"{allowed}\""),
                );
            }
        }
    }
    directory.join(file_name)
}

/// A `.partial` file being written; removed when dropped unless committed.
pub struct PartialFile {
    partial: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl PartialFile {
    /// Create `<target>.partial` exclusively (an existing file or symbolic
    /// link there is an error, never followed). An existing target is an
    /// error unless `overwrite`.
    pub fn create(target: PathBuf, overwrite: bool) -> PartialFile {
        if !overwrite && std::fs::symlink_metadata(&target).is_ok() {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("file \"{}\" already exists", target.display()),
                Some("pass overwrite => true to replace it"),
            );
        }
        let mut partial = target.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        match OpenOptions::new().write(true).create_new(true).open(&partial) {
            Ok(file) => PartialFile { partial, target, file: Some(file) },
            Err(e) => raise(
                match e.kind() {
                    io::ErrorKind::AlreadyExists => PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                    io::ErrorKind::PermissionDenied => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    _ => PgSqlErrorCode::ERRCODE_IO_ERROR,
                },
                format!("could not create file \"{}\": {e}", partial.display()),
                (e.kind() == io::ErrorKind::AlreadyExists)
                    .then_some("another export to the same path is running, or an earlier one left this file; remove it"),
            ),
        }
    }

    /// The open file, to write to; handed back to [`PartialFile::commit`].
    pub fn take_file(&mut self) -> io::Result<File> {
        self.file
            .take()
            .ok_or_else(|| io::Error::other("the partial file was already taken"))
    }

    /// Flush `file` (this partial file, fully written) to disk and rename
    /// it into place; returns the final path. Like PostgreSQL's own files,
    /// the flushes follow the server's `fsync` setting.
    pub fn commit(mut self, file: File) -> io::Result<PathBuf> {
        // SAFETY: reads the `fsync` GUC's variable.
        let flush = unsafe { pg_sys::enableFsync };
        if flush {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&self.partial, &self.target)?;
        if let Some(dir) = self.target.parent() {
            if flush {
                File::open(dir)?.sync_all()?;
            }
        }
        self.partial = PathBuf::new();
        Ok(self.target.clone())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.partial.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// The SQLSTATE for a failed write.
pub fn raise_io(err: io::Error, what: &str) -> ! {
    let code = match err.raw_os_error() {
        Some(28) => PgSqlErrorCode::ERRCODE_DISK_FULL, // ENOSPC
        Some(122) => PgSqlErrorCode::ERRCODE_DISK_FULL, // EDQUOT
        Some(27) => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED, // EFBIG
        _ => PgSqlErrorCode::ERRCODE_IO_ERROR,
    };
    raise(code, format!("could not write {what}: {err}"), None)
}
