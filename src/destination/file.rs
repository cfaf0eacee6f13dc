//! Server files: who may write them, where, and how.
//!
//! Every file is reached through a [`Directory`] handle, opened once and
//! checked against `pg_stream_export.allowed_directory` by what it *is*
//! (its real path through the handle), so that swapping a directory for a
//! symbolic link after the check cannot redirect a write. Files are made by
//! [`PartialFile`]: an unnamed file, locked with `flock` before it gets its
//! `<name>.partial` name, so a partial file without a lock always belongs
//! to an export that died and can be replaced, while a live export's
//! partial file is never touched. A process that exits on FATAL
//! (terminated, shut down) removes its own partial files on the way out;
//! one killed outright leaves them for the next export. The final rename
//! never replaces a file that appeared meanwhile unless overwrite is asked.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::raise;

fn insufficient(message: impl Into<String>, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        message,
        Some(hint),
    )
}

/// Superuser, or a member of `role` (a role's OID).
pub fn is_superuser_or_member_of(role: u32) -> bool {
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

/// The SQLSTATE for a failed file operation, from its errno.
pub fn file_error_code(err: &io::Error) -> PgSqlErrorCode {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
        Some(libc::EEXIST) => PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
        }
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => PgSqlErrorCode::ERRCODE_DISK_FULL,
        Some(libc::EFBIG) => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        _ => PgSqlErrorCode::ERRCODE_IO_ERROR,
    }
}

/// Raise `err` with the SQLSTATE of its errno: `could not <action>: <err>`.
pub fn raise_file_error(err: io::Error, action: impl std::fmt::Display) -> ! {
    // The writer of an export may be an upload to object storage.
    crate::destination::object::raise_if_upload_error(&err);
    raise(
        file_error_code(&err),
        format!("could not {action}: {err}"),
        None,
    )
}

/// The SQLSTATE for a failed write of export output.
pub fn raise_io(err: io::Error, what: &str) -> ! {
    raise_file_error(err, format_args!("write {what}"))
}

fn c_name(name: &OsStr) -> CString {
    CString::new(name.as_bytes()).unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a file name must not contain a NUL byte",
            None,
        )
    })
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: fstat fills the zeroed struct for a valid descriptor.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstat(fd, &mut st))?;
        Ok(st)
    }
}

/// An open directory on the database server; every file of an export is
/// created, renamed and removed relative to it.
#[derive(Clone)]
pub struct Directory {
    inner: Rc<DirectoryInner>,
}

struct DirectoryInner {
    fd: OwnedFd,
    /// The path it was opened by (for messages and for workers).
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Directory {
    /// Open `path` (absolute) as a directory without following a final
    /// symbolic link.
    fn open_path(path: &Path) -> io::Result<Directory> {
        let c_path = c_name(path.as_os_str());
        // SAFETY: open(2) on a NUL-terminated path; the descriptor is owned
        // by the OwnedFd from here on.
        let fd = unsafe {
            let fd = cvt(libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            ))?;
            OwnedFd::from_raw_fd(fd)
        };
        let st = fstat(fd.as_raw_fd())?;
        Ok(Directory {
            inner: Rc::new(DirectoryInner {
                fd,
                path: path.to_path_buf(),
                dev: st.st_dev,
                ino: st.st_ino,
            }),
        })
    }

    /// Open the directory that a checked path names, as [`resolve_target`]
    /// and [`resolve_directory`] do.
    fn open_checked(given: &Path) -> Directory {
        let directory = given
            .canonicalize()
            .and_then(|canonical| Directory::open_path(&canonical))
            .unwrap_or_else(|e| {
                raise_file_error(e, format_args!("open directory \"{}\"", given.display()))
            });
        directory.check_allowed(&given.to_string_lossy());
        directory
    }

    /// Reopen the directory the leader of a directory export opened: the
    /// same path must still be the same directory (device and inode), or
    /// the export stops.
    pub fn reopen(path: &Path, identity: (u64, u64)) -> Directory {
        let opened = Directory::open_path(path);
        if opened.as_ref().map(Directory::identity).ok() != Some(identity) {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "directory \"{}\" was replaced or removed during the export",
                    path.display()
                ),
                Some("the directory checked at the start is no longer at that path; nothing is written elsewhere"),
            );
        }
        opened.unwrap_or_else(|e| raise_file_error(e, "open directory"))
    }

    /// (device, inode): what the directory is, whatever its name.
    pub fn identity(&self) -> (u64, u64) {
        (self.inner.dev, self.inner.ino)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn fd(&self) -> libc::c_int {
        self.inner.fd.as_raw_fd()
    }

    /// Where the handle really is now, from the kernel.
    fn real_path(&self) -> io::Result<PathBuf> {
        std::fs::read_link(format!("/proc/self/fd/{}", self.fd()))
    }

    /// With `pg_stream_export.allowed_directory` set, the directory itself
    /// (not just the name it was reached by) must be inside it.
    fn check_allowed(&self, given: &str) {
        let Some(allowed) = crate::gucs::allowed_directory() else {
            return;
        };
        let inside = match (Path::new(&allowed).canonicalize(), self.real_path()) {
            (Ok(root), Ok(real)) => real.starts_with(&root),
            _ => false,
        };
        if !inside {
            insufficient(
                format!("path \"{given}\" is outside pg_stream_export.allowed_directory"),
                &format!("export files must be inside \"{allowed}\""),
            );
        }
    }

    /// The metadata of `name` in this directory, without following a link.
    pub fn stat(&self, name: &OsStr) -> io::Result<libc::stat> {
        let c = c_name(name);
        // SAFETY: fstatat(2) relative to our descriptor; fills a zeroed struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            cvt(libc::fstatat(
                self.fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ))?;
            Ok(st)
        }
    }

    pub fn contains(&self, name: &OsStr) -> bool {
        self.stat(name).is_ok()
    }

    /// Remove `name` from this directory (never follows a link).
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        let c = c_name(name);
        // SAFETY: unlinkat(2) relative to our descriptor.
        cvt(unsafe { libc::unlinkat(self.fd(), c.as_ptr(), 0) }).map(|_| ())
    }

    /// The names in this directory.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", self.fd()))? {
            names.push(entry?.file_name());
        }
        Ok(names)
    }

    /// Open `name` for reading: a regular file only, never through a link,
    /// and without blocking on a FIFO.
    pub fn open_regular(&self, name: &OsStr) -> io::Result<File> {
        open_regular_at(self.fd(), &c_name(name)).map(|(file, _)| file)
    }

    /// Open `name` to append to, creating it if need be; never through a
    /// symbolic link.
    pub fn open_append(&self, name: &OsStr) -> io::Result<File> {
        let name = c_name(name);
        // SAFETY: openat(2) within our directory; the descriptor is owned
        // by the File.
        unsafe {
            let fd = cvt(libc::openat(
                self.fd(),
                name.as_ptr(),
                libc::O_WRONLY
                    | libc::O_APPEND
                    | libc::O_CREAT
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC,
                0o600,
            ))?;
            let file = File::from_raw_fd(fd);
            cvt(libc::fchmod(fd, crate::gucs::file_mode()))?;
            Ok(file)
        }
    }

    /// Flush the directory entry changes, when the server flushes files.
    pub fn sync(&self) -> io::Result<()> {
        if flush_enabled() {
            // SAFETY: fsync of a descriptor this value owns.
            cvt(unsafe { libc::fsync(self.fd()) })?;
        }
        Ok(())
    }

    pub fn display(&self, name: &OsStr) -> String {
        self.path().join(name).display().to_string()
    }
}

/// Open a regular file for reading without blocking (a FIFO would) and
/// without following a final symbolic link; anything else is refused.
/// Returns the file and its metadata.
fn open_regular_at(dirfd: libc::c_int, name: &CStr) -> io::Result<(File, libc::stat)> {
    // SAFETY: openat(2) on a NUL-terminated name; the descriptor is owned
    // by the File from here on.
    let file = unsafe {
        let fd = cvt(libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY,
        ))?;
        File::from_raw_fd(fd)
    };
    let st = fstat(file.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, st))
}

/// Open a server file named by an absolute path for reading: a regular
/// file, never a FIFO, device or directory (those are refused without
/// blocking). Links in the path are followed, as for COPY FROM.
pub fn open_regular_file(path: &str) -> File {
    let c_path = CString::new(path).unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a path must not contain a NUL byte",
            None,
        )
    });
    // SAFETY: open(2) with O_NONBLOCK so that a FIFO does not block; the
    // descriptor is owned by the File.
    let opened = unsafe {
        cvt(libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        ))
        .map(|fd| File::from_raw_fd(fd))
    };
    let file = opened.unwrap_or_else(|e| raise_file_error(e, format_args!("open file \"{path}\"")));
    match fstat(file.as_raw_fd()) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => file,
        Ok(_) => raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{path}\" is not a regular file"),
            Some("only export files can be verified; FIFOs, devices and directories are refused"),
        ),
        Err(e) => raise_file_error(e, format_args!("stat file \"{path}\"")),
    }
}

/// Check `path` and return the directory it is in (opened and checked)
/// and the file name: absolute, naming a file in an existing directory,
/// and inside `pg_stream_export.allowed_directory` when that is set.
pub fn resolve_target(path: &str) -> (Directory, OsString) {
    require_absolute(path);
    let given = Path::new(path);
    let Some(Component::Normal(file_name)) = given.components().next_back() else {
        insufficient(
            format!("path \"{path}\" does not name a file"),
            "give an absolute path to a file",
        );
    };
    let parent = given.parent().unwrap_or(Path::new("/"));
    (Directory::open_checked(parent), file_name.to_os_string())
}

/// Check and open a directory for a directory export.
pub fn resolve_directory(path: &str) -> Directory {
    require_absolute(path);
    Directory::open_checked(Path::new(path))
}

/// Open a directory to read an export from it. `allowed_directory` limits
/// where exports are written, not what may be verified (as for
/// `stream_export_verify`), so it is not applied here.
pub fn open_directory_for_reading(path: &str) -> Directory {
    require_absolute(path);
    let given = Path::new(path);
    given
        .canonicalize()
        .and_then(|canonical| Directory::open_path(&canonical))
        .unwrap_or_else(|e| raise_file_error(e, format_args!("open directory \"{path}\"")))
}

/// Whether the server flushes files (`fsync`); export files follow it.
pub fn flush_enabled() -> bool {
    // SAFETY: reads the `fsync` GUC's variable.
    unsafe { pg_sys::enableFsync }
}

fn partial_name_of(target: &OsStr) -> OsString {
    let mut partial = target.to_os_string();
    partial.push(".partial");
    partial
}

/// Create an unnamed file in `dir`, lock it, and give it `name`; the link
/// fails with EEXIST when something is at `name` already. Where the file
/// system has no unnamed files, a uniquely named one is made, locked and
/// linked instead.
fn create_locked(dir: &Directory, name: &CStr, mode: libc::mode_t) -> io::Result<File> {
    // SAFETY: openat(2) with O_TMPFILE creates an unnamed file owned by the
    // File; flock(2) and linkat(2) act on that descriptor and name.
    unsafe {
        let fd = libc::openat(
            dir.fd(),
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            let file = File::from_raw_fd(fd);
            // The mode explicitly: open(2) applies the server's umask
            // (usually 077), and COPY's files are 0644.
            cvt(libc::fchmod(fd, mode))?;
            cvt(libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB))?;
            let proc_path = CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            cvt(libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                dir.fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            ))?;
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if !matches!(
            err.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
        ) {
            return Err(err);
        }
        // No O_TMPFILE here: a private name first.
        let private = CString::new(format!(
            ".{}.{}.{}",
            name.to_string_lossy(),
            std::process::id(),
            next_serial()
        ))
        .unwrap_or_default();
        let fd = cvt(libc::openat(
            dir.fd(),
            private.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        ))?;
        let file = File::from_raw_fd(fd);
        let linked = cvt(libc::fchmod(fd, mode))
            .and_then(|_| cvt(libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB)))
            .and_then(|_| {
                cvt(libc::linkat(
                    dir.fd(),
                    private.as_ptr(),
                    dir.fd(),
                    name.as_ptr(),
                    0,
                ))
            });
        libc::unlinkat(dir.fd(), private.as_ptr(), 0);
        linked.map(|_| file)
    }
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// What stood at a name that an export wanted to use or clean up.
pub enum Occupant {
    /// An abandoned export file (see [`remove_if_abandoned`]): removed;
    /// its size in bytes.
    Removed(i64),
    /// Nothing is there any more, or it changed while we looked.
    Gone,
    /// A live export holds it (it is locked).
    Live,
    /// Something that is not an export's file: why, and what to do.
    Foreign(&'static str, &'static str),
}

/// Remove `name` if it is an abandoned export file: a regular file of this
/// server's OS user, with no other name, that no live export holds (we can
/// lock it; every export keeps its files locked while it runs). The lock
/// is held while the name is checked again and removed. Never follows a
/// link and never touches anything else.
pub fn remove_if_abandoned(dir: &Directory, name: &OsStr) -> io::Result<Occupant> {
    let (file, st) = match open_regular_at(dir.fd(), &c_name(name)) {
        Ok(opened) => opened,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Occupant::Gone),
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP)
                || e.kind() == io::ErrorKind::InvalidInput =>
        {
            return Ok(Occupant::Foreign(
                "something that is not an export's partial file is there",
                "a symbolic link, FIFO or directory at the partial file's name is never followed or replaced; remove it",
            ))
        }
        Err(e) => return Err(e),
    };
    // SAFETY: geteuid(2) has no preconditions.
    if st.st_uid != unsafe { libc::geteuid() } {
        return Ok(Occupant::Foreign(
            "a file of another owner is there",
            "only a partial file this server made is replaced; remove it",
        ));
    }
    // SAFETY: a non-blocking lock attempt on our own descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(Occupant::Live);
    }
    // Locked by us now: no live export holds it. Remove it only if the
    // name still means this very file.
    match dir.stat(name) {
        Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
        _ => return Ok(Occupant::Gone),
    }
    if st.st_nlink != 1 {
        return Ok(Occupant::Foreign(
            "the file there has other names (hard links)",
            "only a partial file this server made is replaced; remove it",
        ));
    }
    dir.unlink(name)?;
    Ok(Occupant::Removed(st.st_size))
}

/// Make way at a partial file's name: a stale partial file is removed (and
/// logged); a live export's file and anything that is not an export's file
/// is an error (`58P02`) and is left as it is.
fn take_over_stale(dir: &Directory, name: &OsStr) {
    let path = dir.display(name);
    let refuse = |why: &str, hint: &str| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!("could not create file \"{path}\": {why}"),
            Some(hint),
        )
    };
    match remove_if_abandoned(dir, name) {
        Ok(Occupant::Removed(size)) => pgrx::log!(
            "pg_stream_export: removed stale partial file \"{path}\" ({size} bytes) left by an export that did not finish"
        ),
        Ok(Occupant::Gone) => {}
        Ok(Occupant::Live) => refuse(
            "another export to the same path is running",
            "wait for it to finish, or cancel it",
        ),
        Ok(Occupant::Foreign(why, hint)) => refuse(why, hint),
        Err(e) => raise_file_error(e, format_args!("replace stale file \"{path}\"")),
    }
}

/// Partial files this process is writing, for [`remove_partials_on_exit`]:
/// the directory's descriptor, the partial name and the file's identity.
struct LivePartial {
    serial: u64,
    dirfd: libc::c_int,
    name: CString,
    identity: (u64, u64),
}

static LIVE_PARTIALS: std::sync::Mutex<Vec<LivePartial>> = std::sync::Mutex::new(Vec::new());

/// Remember a partial file until it is committed or dropped, so that a
/// process that exits on FATAL (terminated, shut down) removes its partial
/// files before it leaves: no Rust destructor runs on that path.
fn register_live_partial(entry: LivePartial) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static HOOKED: AtomicBool = AtomicBool::new(false);
    if !HOOKED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers a callback that only makes system calls; once
        // per process, far below PostgreSQL's limit on exit callbacks.
        unsafe { pg_sys::before_shmem_exit(Some(remove_partials_on_exit), pg_sys::Datum::from(0)) };
    }
    if let Ok(mut live) = LIVE_PARTIALS.lock() {
        live.push(entry);
    }
}

fn unregister_live_partial(serial: u64) {
    if let Ok(mut live) = LIVE_PARTIALS.lock() {
        live.retain(|p| p.serial != serial);
    }
}

/// Runs as the process exits (before it leaves shared memory, so before
/// it disappears from `pg_stat_activity`): removes the partial files it
/// was still writing, if their names still mean those files. Never calls
/// into PostgreSQL and never panics. A process killed outright leaves its
/// partial files; the next export to the same name replaces them.
///
/// # Safety
///
/// Only as an exit callback of this process; it touches no PostgreSQL state.
unsafe extern "C-unwind" fn remove_partials_on_exit(_code: libc::c_int, _arg: pg_sys::Datum) {
    let Ok(live) = LIVE_PARTIALS.try_lock() else {
        return;
    };
    for partial in live.iter() {
        // The descriptors of registered partial files stay open until they
        // are unregistered.
        unlink_if_identical(partial.dirfd, &partial.name, partial.identity);
    }
}

/// Remove `name` in the directory `dirfd` if it still is the file with
/// `identity` (device, inode); never follows a link. Only system calls:
/// safe in exit callbacks and while an error unwinds.
fn unlink_if_identical(dirfd: libc::c_int, name: &CStr, identity: (u64, u64)) {
    // SAFETY: fstatat(2) into a zeroed struct and unlinkat(2), by name
    // relative to the caller's open directory.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0
            && (st.st_dev, st.st_ino) == identity
        {
            libc::unlinkat(dirfd, name.as_ptr(), 0);
        }
    }
}

/// A `<target>.partial` file being written; it holds an exclusive lock for
/// the export's lifetime and is removed when dropped unless committed.
pub struct PartialFile {
    dir: Directory,
    partial: OsString,
    target: OsString,
    /// A second descriptor of the partial file: the lock lives as long as
    /// this does, whoever writes through the other one.
    lock: Option<File>,
    file: Option<File>,
    identity: (u64, u64),
    /// Its entry in the process's list of live partial files.
    serial: u64,
}

impl PartialFile {
    /// Create `<target>.partial` in `dir` (a stale one is replaced; see
    /// [`take_over_stale`]). An existing target is an error unless
    /// `overwrite`.
    pub fn create(dir: &Directory, target: &OsStr, overwrite: bool) -> PartialFile {
        if !overwrite && dir.contains(target) {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("file \"{}\" already exists", dir.display(target)),
                Some("pass overwrite => true to replace it"),
            );
        }
        let partial = partial_name_of(target);
        let c_partial = c_name(&partial);
        for _ in 0..8 {
            match create_locked(dir, &c_partial, crate::gucs::file_mode()) {
                Ok(file) => {
                    let lock = file
                        .try_clone()
                        .unwrap_or_else(|e| raise_file_error(e, "duplicate a file descriptor"));
                    let st = fstat(file.as_raw_fd()).unwrap_or_else(|e| {
                        raise_file_error(e, format_args!("stat \"{}\"", dir.display(&partial)))
                    });
                    let serial = next_serial();
                    register_live_partial(LivePartial {
                        serial,
                        dirfd: dir.fd(),
                        name: c_partial.clone(),
                        identity: (st.st_dev, st.st_ino),
                    });
                    return PartialFile {
                        dir: dir.clone(),
                        partial,
                        target: target.to_os_string(),
                        lock: Some(lock),
                        file: Some(file),
                        identity: (st.st_dev, st.st_ino),
                        serial,
                    };
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    take_over_stale(dir, &partial);
                }
                Err(e) => {
                    raise_file_error(e, format_args!("create file \"{}\"", dir.display(&partial)))
                }
            }
        }
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!(
                "could not create file \"{}\": it keeps reappearing",
                dir.display(&partial)
            ),
            Some("another process is creating files at this path"),
        )
    }

    /// The open file, to write to; handed back to [`PartialFile::commit`].
    pub fn take_file(&mut self) -> io::Result<File> {
        self.file
            .take()
            .ok_or_else(|| io::Error::other("the partial file was already taken"))
    }

    pub fn target_path(&self) -> PathBuf {
        self.dir.path().join(&self.target)
    }

    fn flush(&self, file: File) -> io::Result<()> {
        if flush_enabled() {
            file.sync_all()?;
        }
        Ok(())
    }

    fn rename(&self, flags: libc::c_uint) -> io::Result<()> {
        let (from, to) = (c_name(&self.partial), c_name(&self.target));
        // SAFETY: renameat2(2) within our directory.
        cvt(unsafe {
            libc::renameat2(
                self.dir.fd(),
                from.as_ptr(),
                self.dir.fd(),
                to.as_ptr(),
                flags,
            )
        })
        .map(|_| ())
    }

    /// Flush `file` (this partial file, fully written) to disk and give it
    /// the target name: replacing what is there when `overwrite`, else
    /// failing (`58P02`) if a file appeared there meanwhile. Like
    /// PostgreSQL's own files, the flushes follow the server's `fsync`.
    pub fn commit(self, file: File, overwrite: bool) -> PathBuf {
        let target = self.target_path();
        self.commit_returning_replaced(file, overwrite);
        target
    }

    /// As [`PartialFile::commit`]; with `overwrite`, the file that was
    /// replaced is swapped out atomically and returned, open, so that the
    /// caller can read it (its name is gone).
    pub fn commit_returning_replaced(mut self, file: File, overwrite: bool) -> Option<File> {
        let target = self.target_path();
        self.flush(file).unwrap_or_else(|e| {
            raise_file_error(e, format_args!("flush \"{}\"", target.display()))
        });
        let mut replaced = None;
        let renamed = if overwrite {
            match self.rename(libc::RENAME_EXCHANGE) {
                Ok(()) => {
                    // Our partial name now holds the old file.
                    replaced = self.dir.open_regular(&self.partial).ok();
                    let _ = self.dir.unlink(&self.partial);
                    Ok(())
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.rename(0),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.rename(0),
                Err(e) => Err(e),
            }
        } else {
            match self.rename(libc::RENAME_NOREPLACE) {
                // A file system without RENAME_NOREPLACE: a hard link also
                // never replaces anything.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let (from, to) = (c_name(&self.partial), c_name(&self.target));
                    // SAFETY: linkat(2) within our directory.
                    cvt(unsafe {
                        libc::linkat(self.dir.fd(), from.as_ptr(), self.dir.fd(), to.as_ptr(), 0)
                    })
                    .map(|_| {
                        let _ = self.dir.unlink(&self.partial);
                    })
                }
                other => other,
            }
        };
        match renamed {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("file \"{}\" appeared during the export", target.display()),
                Some("it was left as it is; pass overwrite => true to replace it"),
            ),
            Err(e) => raise_file_error(
                e,
                format_args!("rename \"{}\" into place", target.display()),
            ),
        }
        // Renamed: nothing is left to remove, whatever happens next.
        self.partial = OsString::new();
        unregister_live_partial(self.serial);
        self.dir.sync().unwrap_or_else(|e| {
            raise_file_error(
                e,
                format_args!("flush directory \"{}\"", self.dir.path().display()),
            )
        });
        self.lock = None;
        replaced
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        // Never raises: this also runs while an error unwinds.
        self.file = None;
        if !self.partial.is_empty() {
            unlink_if_identical(self.dir.fd(), &c_name(&self.partial), self.identity);
        }
        unregister_live_partial(self.serial);
        // The lock goes last, once the name is gone.
        self.lock = None;
    }
}
