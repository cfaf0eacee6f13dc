//! Where an export goes: every destination lives here, one module each.
//!
//! The engine writes record lines into an
//! [`crate::sink::ExportWriter`], which counts, checksums and compresses
//! them and writes the finished bytes to a destination through
//! [`std::io::Write`]; that is the one interface every destination
//! implements, and finishing is each destination's own commit:
//!
//! - [`file`]: a file on the server (a locked `.partial` file written by a
//!   helper thread, [`background`], renamed into place), and server
//!   directories ([`listing`]: their manifest and journal files);
//! - [`object`]: an object in S3-compatible storage (a multipart upload by
//!   helper threads, completed at the end);
//! - [`output`]: one file or object being written, either kind, committed
//!   at the end; [`directory`]: the one backend of exports that write
//!   several files (a server directory or an object prefix);
//! - [`client`]: the client of `COPY ... TO STDOUT` (CopyData messages);
//! - [`bytea`]: the rows of `stream_export_bytes` (fixed-size chunks).
//!
//! Server-side targets are given as text: a path, or an object URI.
//! [`Target::parse`] tells them apart; each kind keeps its privilege
//! checks, path or URI rules and error codes in its module, and
//! [`Output`](output::Output) and [`ExportDirectory`] dispatch every
//! storage step to either kind, so a new kind of target touches those two
//! and its own module only. Running
//! an export into a destination is `crate::run`'s: nothing here names the
//! export.

pub mod background;
pub mod bytea;
pub mod client;
pub mod directory;
pub mod file;
pub mod listing;
pub mod object;
pub mod output;
pub mod program;

pub use directory::{ExportDirectory, ManifestClaim};

use object::uri::{looks_like_uri, ObjectUri};

/// A server-side export target as the user wrote it.
pub enum Target<'a> {
    Path(&'a str),
    Object(ObjectUri),
}

impl<'a> Target<'a> {
    /// A path, or an object URI (raising `0A000`/`22023` for bad URIs).
    /// `prefix`: the target is a directory (a key prefix for objects).
    pub fn parse(text: &'a str, prefix: bool) -> Target<'a> {
        if looks_like_uri(text) {
            Target::Object(object::parse_uri(text, prefix))
        } else {
            Target::Path(text)
        }
    }
}

/// A reader of an export for verification: a server file or an object.
pub fn open_for_verify(target: &str) -> Box<dyn std::io::Read> {
    match Target::parse(target, false) {
        Target::Object(uri) => Box::new(object::open_reader(&uri)),
        Target::Path(path) => {
            crate::destination::file::check_read_privilege();
            crate::destination::file::require_absolute(path);
            Box::new(crate::destination::file::open_regular_file(path))
        }
    }
}
