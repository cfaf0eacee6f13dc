//! One file or object being written by a single-target export (or as one
//! part of a directory export): an [`std::io::Write`] that is put in place
//! by [`Output::commit`] and leaves nothing behind when dropped uncommitted.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use super::background::BackgroundWriter;
use super::directory::CommitPoint;
use super::file::{raise_io, Directory, PartialFile};
use super::object::{self, upload::ObjectUpload, uri::ObjectUri};
use super::program::Program;

pub enum Output {
    /// A locked `.partial` file written by a helper thread, renamed into
    /// place on commit.
    File {
        partial: PartialFile,
        writer: BackgroundWriter,
        overwrite: bool,
    },
    /// A multipart upload, completed on commit.
    Object {
        upload: ObjectUpload,
        uri: ObjectUri,
    },
    /// A shell command's standard input, committed when it exits with 0.
    Program(Program),
}

impl Output {
    /// `name` in `dir` (`58P02` if it exists and not `overwrite`).
    pub fn file(dir: &Directory, name: &OsStr, overwrite: bool) -> Output {
        let mut partial = PartialFile::create(dir, name, overwrite);
        let file: File = partial
            .take_file()
            .unwrap_or_else(|e| raise_io(e, "export output"));
        Output::File {
            partial,
            writer: BackgroundWriter::new(file),
            overwrite,
        }
    }

    /// The object `uri`, checked as [`object::open_upload`] checks it.
    pub fn object(uri: &ObjectUri, overwrite: bool) -> Output {
        Output::Object {
            upload: object::open_upload(uri, overwrite),
            uri: uri.clone(),
        }
    }

    /// The object `uri` with `client`, unchecked: for objects an export
    /// owns (a chunk that may be rewritten).
    pub fn object_with(
        client: &std::sync::Arc<object::client::Client>,
        uri: &ObjectUri,
        overwrite: bool,
    ) -> Output {
        Output::Object {
            upload: object::upload_with(client, uri, overwrite),
            uri: uri.clone(),
        }
    }

    /// `command`'s input (the caller checked the privilege).
    pub fn program(command: &str) -> Output {
        Output::Program(Program::start(command))
    }

    /// As shown to users: the file's path or the object's URI.
    pub fn describe(&self) -> String {
        match self {
            Output::File { partial, .. } => partial.target_path().display().to_string(),
            Output::Object { uri, .. } => uri.to_string(),
            Output::Program(program) => program.describe(),
        }
    }

    /// Put what was written in place (the rename, the upload's completion).
    /// A cancel still acts afterwards (a part of a directory export is not
    /// the export's commit point), but never cuts the request that makes an
    /// object appear short: when this returns or raises, whether the object
    /// is there is known, so a failure's clean-up finds it. Returns the
    /// file's path or the object's URI.
    pub fn commit(self) -> PathBuf {
        self.commit_with(&mut |_| {})
    }

    /// [`Output::commit`] for a single-target export, whose output is its
    /// commit point: from just before the rename or the request that makes
    /// the object appear, a cancel comes too late, and the call succeeds
    /// when the output is in place.
    pub fn commit_export(self) -> PathBuf {
        let mut point = None;
        let path = self.commit_with(&mut |entering| {
            if entering {
                point = Some(CommitPoint::enter());
            } else if let Some(point) = point.take() {
                // Failed before anything was committed: the cancel acts.
                drop(point);
            }
        });
        if let Some(point) = point {
            point.committed();
        }
        path
    }

    /// `at_commit(true)` is called just before the output is put in place,
    /// `at_commit(false)` when that failed (before raising).
    fn commit_with(self, at_commit: &mut dyn FnMut(bool)) -> PathBuf {
        match self {
            Output::File {
                partial,
                writer,
                overwrite,
            } => {
                let file = writer
                    .finish()
                    .unwrap_or_else(|e| raise_io(e, "export output"));
                at_commit(true);
                partial.commit(file, overwrite)
            }
            Output::Object { upload, uri } => {
                if let Err(e) = upload.finish(&mut || at_commit(true)) {
                    at_commit(false);
                    object::raise_upload_error(e, &uri);
                }
                PathBuf::from(uri.to_string())
            }
            Output::Program(program) => {
                let shown = program.describe();
                program.finish();
                PathBuf::from(shown)
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::File { writer, .. } => writer.write(buf),
            Output::Object { upload, .. } => upload.write(buf),
            Output::Program(program) => program.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::File { writer, .. } => writer.write_all(buf),
            Output::Object { upload, .. } => upload.write_all(buf),
            Output::Program(program) => program.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::File { writer, .. } => writer.flush(),
            Output::Object { upload, .. } => upload.flush(),
            Output::Program(program) => program.flush(),
        }
    }
}
