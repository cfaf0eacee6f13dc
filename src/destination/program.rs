//! `COPY ... TO PROGRAM 'command' (FORMAT ndjson)`: the export written into
//! a shell command's standard input, as COPY does it.
//!
//! The command runs under `/bin/sh -c` as the server's OS user, with the
//! server's environment, its output going to the server log, in a process
//! group of its own. A helper thread writes into the pipe (it only calls
//! write(2)), and the backend waits for it with interrupts checked, so a
//! command that stops reading can still be cancelled.
//!
//! The export commits when the command has read everything and exited with
//! status 0. On any failure (an error, a cancel) the whole process group is
//! killed BEFORE the pipe is closed: a command such as `aws s3 cp -` or
//! `ssh host 'cat > f'` must never see a clean end of input for an export
//! that did not finish, or it would store a truncated copy as complete.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use pgrx::{pg_sys, PgSqlErrorCode};

use super::background::BackgroundWriter;
use super::file::{is_superuser_or_member_of, raise_io};
use crate::error::raise;

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
    writer: Option<BackgroundWriter>,
}

impl Program {
    /// Start `command` (the caller checked the privilege).
    pub fn start(command: &str) -> Program {
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
        let writer = child.stdin.take().map(|stdin| {
            BackgroundWriter::waiting_with(File::from(OwnedFd::from(stdin)), wait_a_little)
        });
        Program {
            command: command.to_string(),
            child: Some(child),
            writer,
        }
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
            raise(
                PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                format!("program \"{}\" failed", self.command),
                Some(&describe_status(status)),
            );
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
    /// reads a clean end of a partial export, then close the pipe (the
    /// helper's write fails at once) and reap it. Raises nothing.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = child.id() as libc::pid_t;
        // SAFETY: kill(2) of the process group this export started (its
        // leader not yet reaped, so the id is still ours).
        unsafe { libc::kill(-group, libc::SIGKILL) };
        drop(self.writer.take());
        let _ = child.wait();
    }
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
