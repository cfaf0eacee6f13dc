//! Where an export goes: every destination lives here, one module each.
//!
//! The engine writes record lines into an
//! [`crate::sink::ExportWriter`], which counts, checksums and compresses
//! them and writes the finished bytes to a destination through
//! [`std::io::Write`]; that is the one interface every destination
//! implements, and finishing is each destination's own commit:
//!
//! - [`file`]: a file on the server (a locked `.partial` file written by a
//!   helper thread, renamed into place), and server directories;
//! - [`object`]: an object in S3-compatible storage (a multipart upload by
//!   helper threads, completed at the end);
//! - [`client`]: the client of `COPY ... TO STDOUT` (CopyData messages);
//! - [`bytea`]: the rows of `stream_export_bytes` (fixed-size chunks).
//!
//! Server-side targets are given as text: a path, or an object URI.
//! [`Target::parse`] tells them apart; each kind keeps its privilege
//! checks, path or URI rules and error codes in its module, and
//! [`ExportDirectory`] dispatches a directory export's storage steps to
//! either kind, so a new kind of target touches this module only. Running
//! an export into a destination is `crate::run`'s: nothing here names the
//! export.

pub mod bytea;
pub mod client;
pub mod file;
pub mod listing;
pub mod object;

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

/// Where a directory export's part files and manifest go: a directory on
/// the server, or a key prefix in object storage.
#[derive(Clone)]
pub enum ExportDirectory {
    Server(crate::destination::file::Directory),
    Prefix(ObjectUri),
}

/// The claim on a directory's manifest, held from the start of a
/// directory export until its manifest is in place (the commit point).
pub enum ManifestClaim {
    /// The locked `manifest.json.partial`: one export per directory.
    Server(crate::destination::file::PartialFile),
    /// The prefix's lease (one export at a time), and the parts the
    /// manifest there lists now, removed once the new manifest replaced it.
    Prefix {
        replaced_parts: Vec<String>,
        lease: object::Lease,
    },
}

impl ExportDirectory {
    /// Open a directory export's target (privilege checked).
    pub fn open(text: &str) -> ExportDirectory {
        match Target::parse(text, true) {
            Target::Object(uri) => {
                object::check_write_privilege();
                ExportDirectory::Prefix(uri)
            }
            Target::Path(path) => {
                crate::destination::file::check_write_privilege();
                ExportDirectory::Server(crate::destination::file::resolve_directory(path))
            }
        }
    }

    /// As shown to users (path or URI).
    pub fn describe(&self) -> String {
        match self {
            ExportDirectory::Server(dir) => dir.path().display().to_string(),
            ExportDirectory::Prefix(uri) => uri.to_string(),
        }
    }

    /// Claim the manifest for the export `export_id`: `58P02` if a finished
    /// export is there and not `overwrite`, `55006` (object prefix) while
    /// another export holds the prefix's lease. Part files that exports
    /// which died left behind are removed (under a prefix also their
    /// multipart uploads), but not those of the finished export, nor those
    /// of an unfinished chunked export there.
    pub fn claim_manifest(&self, overwrite: bool, export_id: &str) -> ManifestClaim {
        match self {
            ExportDirectory::Server(dir) => {
                let partial = crate::destination::file::PartialFile::create(
                    dir,
                    std::ffi::OsStr::new(crate::layout::MANIFEST),
                    overwrite,
                );
                listing::remove_stale_parts(dir);
                ManifestClaim::Server(partial)
            }
            ExportDirectory::Prefix(prefix) => {
                let client = object::session_client();
                let lease = object::acquire_lease(&client, prefix, export_id);
                let replaced_parts = object::claim_manifest(prefix, overwrite);
                let chunked =
                    object::read_small_json(&client, &prefix.join(crate::layout::PROGRESS_HEADER))
                        .and_then(|header| header["export_id"].as_str().map(str::to_owned));
                object::remove_leftovers(&client, prefix, &|name| {
                    replaced_parts.iter().any(|p| p == name)
                        || chunked.as_deref().is_some_and(|id| {
                            crate::layout::export_id_of_part(name.as_bytes()) == Some(id.as_bytes())
                        })
                });
                ManifestClaim::Prefix {
                    replaced_parts,
                    lease,
                }
            }
        }
    }

    /// Write `listing` as the manifest: the commit point. With `overwrite`,
    /// the parts of the manifest it replaced that it does not list are
    /// removed afterwards.
    pub fn commit_manifest(
        &self,
        claim: ManifestClaim,
        listing: &serde_json::Value,
        overwrite: bool,
    ) {
        match (self, claim) {
            (ExportDirectory::Server(dir), ManifestClaim::Server(partial)) => {
                listing::commit_listing(dir, partial, crate::layout::MANIFEST, listing, overwrite)
            }
            (
                ExportDirectory::Prefix(prefix),
                ManifestClaim::Prefix {
                    replaced_parts,
                    lease,
                },
            ) => {
                object::check_lease(&lease, prefix);
                object::commit_manifest(prefix, listing, overwrite, &replaced_parts);
                drop(lease);
            }
            _ => unreachable!("a manifest claim belongs to its own kind of directory"),
        }
    }

    /// Remove what an export that failed wrote: its parts (in a server
    /// directory, those no live process holds). Never raises.
    pub fn remove_parts_of(&self, export_id: &str) {
        match self {
            ExportDirectory::Server(dir) => {
                let Ok(names) = dir.names() else {
                    return;
                };
                for name in names {
                    use std::os::unix::ffi::OsStrExt;
                    if crate::layout::export_id_of_part(name.as_bytes())
                        == Some(export_id.as_bytes())
                    {
                        let _ = crate::destination::file::remove_if_abandoned(dir, &name);
                    }
                }
            }
            ExportDirectory::Prefix(prefix) => object::remove_parts_of(prefix, export_id),
        }
    }

    /// Open a directory export for verification (read privilege checked).
    pub fn open_for_verify(text: &str) -> ExportDirectory {
        match Target::parse(text, true) {
            Target::Object(uri) => {
                object::check_read_privilege();
                ExportDirectory::Prefix(uri)
            }
            Target::Path(path) => {
                crate::destination::file::check_read_privilege();
                ExportDirectory::Server(crate::destination::file::open_directory_for_reading(path))
            }
        }
    }
}
