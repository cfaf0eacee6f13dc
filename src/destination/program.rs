//! `COPY ... TO PROGRAM 'command' (FORMAT ndjson)`: the export written into
//! a shell command's standard input, as COPY does it.
//!
//! The command runs under `/bin/sh -c` as the server's OS user, with the
//! server's environment, its output going to the server log, in a process
//! group of its own. A helper thread writes into the pipe (it only calls
//! write(2) and poll(2)), and the backend waits for it with interrupts
//! checked, so a command that stops reading can still be cancelled.
//!
//! The export commits when the command has read everything and exited with
//! status 0. On any failure (an error, a cancel, `statement_timeout`) the
//! whole process group is killed BEFORE the pipe is closed: a command such
//! as `aws s3 cp -` or `ssh host 'cat > f'` must never see a clean end of
//! input for an export that did not finish, or it would store a truncated
//! copy as complete. A FATAL exit (`pg_terminate_backend`, a fast or smart
//! shutdown, the postmaster's death) runs no destructor: an exit callback
//! kills the groups still running first, before the process's exit closes
//! the pipe. PostgreSQL's own COPY TO PROGRAM gets the same from the
//! signals it sends to the backend's process group, which ours has left.
//!
//! The helper's writes do not block: a reader outside the group (a
//! grandchild that left it with `setsid`) can keep the pipe open and full
//! after the group is killed, and the helper then gives up within
//! [`WRITE_POLL`] once told to, so the backend never waits for it.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, PgLogLevel, PgSqlErrorCode};

use super::background::BackgroundWriter;
use super::file::{is_superuser_or_member_of, raise_io};
use crate::error::raise;

/// How often the pipe's helper looks whether it must give up while the
/// pipe is full.
const WRITE_POLL: Duration = Duration::from_millis(50);

/// The process groups of the commands this backend runs and has not
/// reaped: what the exit callback kills.
static RUNNING_GROUPS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Running a server program needs what COPY TO PROGRAM needs.
pub fn check_privilege() {
    if !is_superuser_or_member_of(pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to COPY to or from an external program",
            Some("Only superusers and roles with privileges of the pg_execute_server_program role may COPY to or from an external program; others can use COPY ... TO STDOUT and a pipe on the client."),
        );
    }
}

pub struct Program {
    command: String,
    child: Option<Child>,
    writer: Option<BackgroundWriter<Pipe>>,
    /// Tells the helper to stop writing (the pipe is abandoned).
    give_up: Arc<AtomicBool>,
}

impl Program {
    /// Start `command` (the caller checked the privilege).
    pub fn start(command: &str) -> Program {
        register_exit_callback();
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                raise(
                    PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                    format!("could not execute command \"{command}\": {e}"),
                    None,
                )
            });
        // Known to the exit callback before anything can raise.
        groups().push(child.id() as libc::pid_t);
        let give_up = Arc::new(AtomicBool::new(false));
        let mut program = Program {
            command: command.to_string(),
            child: None,
            writer: None,
            give_up: give_up.clone(),
        };
        let stdin = child.stdin.take();
        program.child = Some(child);
        if let Some(stdin) = stdin {
            let pipe = Pipe::new(OwnedFd::from(stdin), give_up)
                .unwrap_or_else(|e| raise_io(e, "to the COPY program"));
            program.writer = Some(BackgroundWriter::waiting_with(pipe, wait_a_little));
        }
        program
    }

    pub fn describe(&self) -> String {
        format!("program \"{}\"", self.command)
    }

    /// Close the command's input and wait for it; the export is committed
    /// once it exited with status 0.
    pub fn finish(mut self) {
        if let Some(writer) = self.writer.take() {
            let input = writer.finish().unwrap_or_else(|e| self.raise_write(e));
            drop(input); // end of input
        }
        let status = loop {
            let Some(child) = self.child.as_mut() else {
                return;
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    forget_group(child.id() as libc::pid_t);
                    self.child = None;
                    break status;
                }
                // Not yet: a cancel here leaves the child to Drop.
                Ok(None) => wait_a_little(),
                Err(e) => raise(
                    PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                    format!("could not wait for command \"{}\": {e}", self.command),
                    None,
                ),
            }
        };
        if !status.success() {
            // As PostgreSQL's COPY words it: the status goes in DETAIL.
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                format!("program \"{}\" failed", self.command),
                "pg_stream_export",
            )
            .set_detail(describe_status(status))
            .report(PgLogLevel::ERROR);
            unreachable!("an ERROR report does not return");
        }
    }

    fn raise_write(&mut self, e: io::Error) -> ! {
        if e.kind() == io::ErrorKind::BrokenPipe {
            raise(
                PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                format!(
                    "program \"{}\" stopped reading its input before the export ended",
                    self.command
                ),
                None,
            );
        }
        raise_io(e, "to the COPY program")
    }
}

impl Write for Program {
    /// A failed write is raised here, where it can name the program (a
    /// broken pipe: the program exited or closed its input).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match &mut self.writer {
            Some(writer) => writer.write(buf),
            None => Err(io::Error::other("the program's input is closed")),
        };
        written.or_else(|e| self.raise_write(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Program {
    /// Uncommitted: kill the command's process group first, so it never
    /// reads a clean end of a partial export, then tell the helper to give
    /// up (it returns within [`WRITE_POLL`] even if a process outside the
    /// group keeps the pipe full), close the pipe and reap the command.
    /// Raises nothing.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = child.id() as libc::pid_t;
        // SAFETY: kill(2) of the process group this export started (its
        // leader not yet reaped, so the id is still ours).
        unsafe { libc::kill(-group, libc::SIGKILL) };
        self.give_up.store(true, Ordering::SeqCst);
        drop(self.writer.take());
        forget_group(group);
        let _ = child.wait();
    }
}

/// The write end of a command's pipe, non-blocking: the helper thread
/// waits for room with poll(2), and gives up when told to.
struct Pipe {
    fd: OwnedFd,
    give_up: Arc<AtomicBool>,
}

impl Pipe {
    fn new(fd: OwnedFd, give_up: Arc<AtomicBool>) -> io::Result<Pipe> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor this struct owns.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe { fd, give_up })
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.give_up.load(Ordering::SeqCst) {
                return Err(io::Error::other("the export stopped"));
            }
            // SAFETY: write(2) of an initialised buffer of `buf.len()` bytes
            // to a descriptor this struct owns.
            let written =
                unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if written >= 0 {
                return Ok(written as usize);
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    let mut fds = libc::pollfd {
                        fd: self.fd.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one pollfd, alive for the call.
                    unsafe { libc::poll(&mut fds, 1, WRITE_POLL.as_millis() as libc::c_int) };
                }
                _ => return Err(error),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The registry of running groups, even if a panic poisoned its lock.
fn groups() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    RUNNING_GROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A group whose leader is about to be reaped: no longer ours to kill.
fn forget_group(group: libc::pid_t) {
    groups().retain(|g| *g != group);
}

fn register_exit_callback() {
    static HOOKED: AtomicBool = AtomicBool::new(false);
    if !HOOKED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers, once per process, a callback that only sends
        // signals.
        unsafe { pg_sys::before_shmem_exit(Some(kill_groups_on_exit), pg_sys::Datum::from(0)) };
    }
}

/// Runs as the process exits on FATAL or shutdown, where no destructor
/// runs: kills the commands still running, before the exit closes their
/// pipes. Never calls into PostgreSQL and never panics.
///
/// # Safety
///
/// Only as an exit callback of this process; it touches no PostgreSQL state.
unsafe extern "C-unwind" fn kill_groups_on_exit(_code: libc::c_int, _arg: pg_sys::Datum) {
    let _ = std::panic::catch_unwind(|| {
        for group in groups().drain(..) {
            // SAFETY: kill(2) of a group whose leader this backend started
            // and has not reaped.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    });
}

/// Wait briefly on the latch, then act on a cancel or timeout.
fn wait_a_little() {
    // SAFETY: WaitLatch on this backend's own latch with a timeout, then
    // ResetLatch; check_for_interrupts raises on the backend's thread.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            10,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// As PostgreSQL words a child's end ("child process exited with exit
/// code 1", "child process was terminated by signal 9").
fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("child process exited with exit code {code}"),
        (None, Some(signal)) => format!("child process was terminated by signal {signal}"),
        _ => format!("child process ended with status {status}"),
    }
}
