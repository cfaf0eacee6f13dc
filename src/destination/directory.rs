//! The one backend of exports that write several files: a directory on the
//! server or a key prefix in object storage. The directory export and the
//! chunked export both go through [`ExportDirectory`]: claiming and
//! committing the manifest, creating part files, the chunked journal, and
//! removing what exports that died left behind. Each step has one arm per
//! kind of place, here and nowhere else.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use pgrx::PgSqlErrorCode;
use serde_json::Value;

use super::file::{self, raise_io, Directory, PartialFile};
use super::listing;
use super::object::{self, client::Client, client::Failure, uri::ObjectUri};
use super::output::Output;
use super::Target;
use crate::error::raise;
use crate::layout::{
    export_id_of_part, is_part_file_name, manifest_parts, MANIFEST, PROGRESS, PROGRESS_HEADER,
};

/// A key prefix, with the session's client once one was needed.
#[derive(Clone)]
pub struct Prefix {
    pub uri: ObjectUri,
    client: OnceCell<Arc<Client>>,
}

impl Prefix {
    pub fn new(uri: ObjectUri) -> Prefix {
        Prefix {
            uri,
            client: OnceCell::new(),
        }
    }

    /// The session's client, made on first use (configuration errors are
    /// raised then, as for a single object).
    pub fn client(&self) -> &Arc<Client> {
        self.client.get_or_init(object::session_client)
    }

    /// The small JSON object `name`; `None` when there is none or it does
    /// not parse. Other failures raise.
    fn read_json(&self, name: &str) -> Option<Value> {
        let uri = self.uri.join(name);
        match self.client().get(&uri) {
            Ok(reader) => crate::layout::read_manifest(reader),
            Err(e) if e.failure == Failure::NotFound => None,
            Err(e) => object::raise_store_error(&e, "read", Some(&uri)),
        }
    }

    fn put_json(&self, name: &str, value: &Value) {
        let uri = self.uri.join(name);
        self.client()
            .put(&uri, (value.to_string() + "\n").as_bytes(), true)
            .unwrap_or_else(|e| object::raise_store_error(&e, "write", Some(&uri)));
    }

    /// The names (relative to the prefix) of the objects under it whose
    /// names start with `start`, in order.
    fn names_under(&self, start: &str) -> Vec<String> {
        let listed = self
            .client()
            .list(&self.uri.join(start))
            .unwrap_or_else(|e| object::raise_store_error(&e, "list", Some(&self.uri)));
        listed
            .into_iter()
            .filter_map(|key| key.strip_prefix(self.uri.key.as_str()).map(str::to_owned))
            .collect()
    }
}

/// Where a directory or chunked export's part files and manifest go.
#[derive(Clone)]
pub enum ExportDirectory {
    Server(Directory),
    Prefix(Prefix),
}

/// The claim on a directory's manifest, held from the start of an export
/// until its manifest is in place (the commit point).
pub enum ManifestClaim {
    /// The locked `manifest.json.partial`: one export per directory.
    Server(PartialFile),
    /// The prefix's lease (one export at a time), and the parts the
    /// manifest there lists now, removed once the new manifest replaced it.
    Prefix {
        replaced_parts: Vec<String>,
        lease: object::Lease,
    },
}

/// A chunked export's journal, open for new chunks: lines appended to
/// `progress.jsonl` in a server directory; in object storage, which cannot
/// append, one object `progress-NNNNNNNNNN.json` per chunk.
pub enum Journal {
    File(std::fs::File),
    Objects,
}

/// The journal object of chunk `index` in object storage.
/// The commit point of an export: interrupts held from just before its
/// manifest is put in place until its clean-up is done, so that a cancel
/// or `statement_timeout` can neither interrupt the commit half-way (the
/// request that puts the manifest, whose outcome would then be unknown)
/// nor fail a call whose export is committed.
pub struct CommitPoint;

impl CommitPoint {
    /// A cancel that came before acts now, before anything is committed.
    pub fn enter() -> CommitPoint {
        pgrx::check_for_interrupts!();
        // SAFETY: HOLD_INTERRUPTS(): the backend's own counter, read and
        // written only by this thread.
        unsafe { pgrx::pg_sys::InterruptHoldoffCount += 1 };
        CommitPoint
    }

    /// The export is committed: a cancel or statement timeout that came
    /// meanwhile came too late, and the call succeeds. A terminate or
    /// shutdown still ends the backend at its next check.
    pub fn committed(self) {
        // SAFETY: clears the flag the cancel handler sets; the backend's
        // own, read and written only by this thread apart from the handler
        // (which only sets it).
        unsafe { pgrx::pg_sys::QueryCancelPending = 0 };
    }
}

impl Drop for CommitPoint {
    fn drop(&mut self) {
        // SAFETY: RESUME_INTERRUPTS(). An ERROR raised meanwhile already set
        // the counter to zero (errfinish does), and then it stays zero.
        unsafe {
            pgrx::pg_sys::InterruptHoldoffCount =
                pgrx::pg_sys::InterruptHoldoffCount.saturating_sub(1);
        }
    }
}

fn journal_entry_name(index: usize) -> String {
    format!("progress-{index:010}.json")
}

/// Is `name` one of the journal's objects?
fn is_journal_object(name: &str) -> bool {
    name == PROGRESS_HEADER
        || name
            .strip_prefix("progress-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .is_some_and(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Append one line to the journal file and flush it (when the server
/// flushes files): from here on what it records counts as done.
fn append_line(journal: &mut std::fs::File, entry: &Value) {
    let line = entry.to_string() + "\n";
    journal
        .write_all(line.as_bytes())
        .and_then(|_| {
            if file::flush_enabled() {
                journal.sync_data()
            } else {
                Ok(())
            }
        })
        .unwrap_or_else(|e| raise_io(e, PROGRESS));
}

impl ExportDirectory {
    /// Open a directory export's target (privilege checked).
    pub fn open(text: &str) -> ExportDirectory {
        match Target::parse(text, true) {
            Target::Object(uri) => {
                object::check_write_privilege();
                ExportDirectory::Prefix(Prefix::new(uri))
            }
            Target::Path(path) => {
                file::check_write_privilege();
                ExportDirectory::Server(file::resolve_directory(path))
            }
        }
    }

    /// Open a directory export for verification (read privilege checked).
    pub fn open_for_verify(text: &str) -> ExportDirectory {
        match Target::parse(text, true) {
            Target::Object(uri) => {
                object::check_read_privilege();
                ExportDirectory::Prefix(Prefix::new(uri))
            }
            Target::Path(path) => {
                file::check_read_privilege();
                ExportDirectory::Server(file::open_directory_for_reading(path))
            }
        }
    }

    /// As shown to users (path or URI).
    pub fn describe(&self) -> String {
        match self {
            ExportDirectory::Server(dir) => dir.path().display().to_string(),
            ExportDirectory::Prefix(prefix) => prefix.uri.to_string(),
        }
    }

    /// The manifest (or journal header) `name`, when there is one that
    /// parses.
    pub fn read_listing(&self, name: &str) -> Option<Value> {
        match self {
            ExportDirectory::Server(dir) => listing::read_listing(dir, name),
            ExportDirectory::Prefix(prefix) => prefix.read_json(name),
        }
    }

    /// Open the file `name` of an export here, to read it back.
    pub fn open_file(&self, name: &str) -> io::Result<Box<dyn io::Read>> {
        match self {
            ExportDirectory::Server(dir) => dir
                .open_regular(OsStr::new(name))
                .map(|f| Box::new(f) as Box<dyn io::Read>),
            ExportDirectory::Prefix(prefix) => prefix
                .client()
                .get(&prefix.uri.join(name))
                .map(|r| Box::new(r) as Box<dyn io::Read>)
                .map_err(io::Error::other),
        }
    }

    /// Claim the manifest for the directory export `export_id`: `58P02` if
    /// a finished export is there and not `overwrite`, `55P03` (object
    /// prefix) while another export holds the prefix's lease; then remove
    /// what exports that died left ([`ExportDirectory::remove_stale_parts`]).
    pub fn claim_manifest(&self, overwrite: bool, export_id: &str) -> ManifestClaim {
        let claim = match self {
            ExportDirectory::Server(dir) => {
                ManifestClaim::Server(PartialFile::create(dir, OsStr::new(MANIFEST), overwrite))
            }
            ExportDirectory::Prefix(prefix) => {
                let lease = object::acquire_lease(prefix.client(), &prefix.uri, export_id);
                ManifestClaim::Prefix {
                    replaced_parts: object::claim_manifest(prefix.client(), &prefix.uri, overwrite),
                    lease,
                }
            }
        };
        self.remove_stale_parts(&claim);
        claim
    }

    /// Claim the manifest for a chunked export, which may continue an
    /// unfinished one here: the lock (server) or the lease (prefix), and
    /// the parts a manifest being replaced lists. Whether a finished export
    /// is there is the caller's to ask ([`ExportDirectory::finished_export`]).
    pub fn claim_for_chunks(&self, overwrite: bool) -> ManifestClaim {
        match self {
            ExportDirectory::Server(dir) => {
                ManifestClaim::Server(PartialFile::create(dir, OsStr::new(MANIFEST), overwrite))
            }
            ExportDirectory::Prefix(prefix) => {
                let lease = object::acquire_lease(prefix.client(), &prefix.uri, "chunked");
                let replaced_parts = prefix
                    .read_json(MANIFEST)
                    .map(|m| manifest_parts(&m))
                    .unwrap_or_default();
                ManifestClaim::Prefix {
                    replaced_parts,
                    lease,
                }
            }
        }
    }

    /// Is a finished export here? A crash between putting a chunked
    /// export's manifest in place and removing its journal leaves both: the
    /// journal of the finished export is removed here.
    pub fn finished_export(&self) -> bool {
        let manifest = self.read_listing(MANIFEST);
        let journal = match self {
            ExportDirectory::Server(dir) => listing::read_journal(dir, |_| {}).map(|(h, _)| h),
            ExportDirectory::Prefix(prefix) => prefix.read_json(PROGRESS_HEADER),
        };
        if let (Some(done), Some(journal)) = (&manifest, journal) {
            if done["export_id"] == journal["export_id"] {
                // Never to be resumed: gone, or an error.
                self.remove_journal();
                self.refuse_journal_left();
            }
        }
        match self {
            // A manifest that does not parse still holds the place.
            ExportDirectory::Server(dir) => dir.contains(OsStr::new(MANIFEST)),
            ExportDirectory::Prefix(_) => manifest.is_some(),
        }
    }

    /// With the manifest claimed, no other export runs here: remove the
    /// part files that neither the finished export (its manifest, or the
    /// parts `claim` will replace) nor an unfinished chunked export (its
    /// journal) holds, and under a prefix every multipart upload in
    /// progress.
    pub fn remove_stale_parts(&self, claim: &ManifestClaim) {
        match (self, claim) {
            (ExportDirectory::Server(dir), _) => listing::remove_stale_parts(dir),
            (ExportDirectory::Prefix(prefix), ManifestClaim::Prefix { replaced_parts, .. }) => {
                // A chunk object put but not yet recorded is its export's
                // still: it is rewritten when the export goes on.
                let chunked = prefix
                    .read_json(PROGRESS_HEADER)
                    .and_then(|header| header["export_id"].as_str().map(str::to_owned));
                object::remove_leftovers(prefix.client(), &prefix.uri, &|name| {
                    replaced_parts.iter().any(|p| p == name)
                        || chunked.as_deref().is_some_and(|id| {
                            export_id_of_part(name.as_bytes()) == Some(id.as_bytes())
                        })
                });
            }
            (ExportDirectory::Prefix(_), ManifestClaim::Server(_)) => {
                unreachable!("a manifest claim belongs to its own kind of directory")
            }
        }
    }

    /// `55P03` when the claim is a lease that was lost: nothing more may be
    /// committed here.
    pub fn check_claim(&self, claim: &ManifestClaim) {
        if let (ExportDirectory::Prefix(prefix), ManifestClaim::Prefix { lease, .. }) =
            (self, claim)
        {
            object::check_lease(lease, &prefix.uri);
        }
    }

    /// Create the part file `name` (replacing one there when `replace`).
    pub fn create_part(&self, name: &str, replace: bool) -> Output {
        match self {
            ExportDirectory::Server(dir) => Output::file(dir, OsStr::new(name), replace),
            ExportDirectory::Prefix(prefix) if replace => {
                Output::object_with(prefix.client(), &prefix.uri.join(name), true)
            }
            ExportDirectory::Prefix(prefix) => Output::object(&prefix.uri.join(name), false),
        }
    }

    /// Which part files are there.
    pub fn parts_present(&self) -> Box<dyn Fn(&str) -> bool + '_> {
        match self {
            ExportDirectory::Server(dir) => {
                Box::new(move |name: &str| dir.contains(OsStr::new(name)))
            }
            ExportDirectory::Prefix(prefix) => {
                let names: HashSet<String> = prefix.names_under("part-").into_iter().collect();
                Box::new(move |name: &str| names.contains(name))
            }
        }
    }

    /// The journal's header and, through `on_entry`, its entries in order;
    /// with where the intact lines of a journal file end.
    pub fn read_journal(&self, mut on_entry: impl FnMut(&Value)) -> Option<(Value, u64)> {
        match self {
            ExportDirectory::Server(dir) => listing::read_journal(dir, on_entry),
            ExportDirectory::Prefix(prefix) => {
                let header = prefix.read_json(PROGRESS_HEADER)?;
                // An entry another export left (its removal failed) is not
                // this journal's: the journal ends before it.
                let own = format!("part-{}-", header["export_id"].as_str().unwrap_or(""));
                let names = prefix.names_under("progress-");
                let entries = names.iter().filter(|n| is_journal_object(n));
                for (index, name) in entries.enumerate() {
                    if *name != journal_entry_name(index) {
                        break;
                    }
                    match prefix.read_json(name) {
                        Some(entry)
                            if entry["file"].as_str().is_some_and(|f| f.starts_with(&own)) =>
                        {
                            on_entry(&entry)
                        }
                        _ => break,
                    }
                }
                Some((header, 0))
            }
        }
    }

    /// Entries `0..count` of the journal as text, one by one (never all in
    /// memory), to copy into the manifest.
    pub fn journal_entries(
        &self,
        count: usize,
    ) -> Box<dyn Iterator<Item = io::Result<String>> + '_> {
        match self {
            ExportDirectory::Server(dir) => {
                use std::io::BufRead;
                let journal = dir
                    .open_regular(OsStr::new(PROGRESS))
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                Box::new(std::io::BufReader::new(journal).lines().skip(1).take(count))
            }
            ExportDirectory::Prefix(prefix) => Box::new((0..count).map(move |index| {
                let name = journal_entry_name(index);
                prefix
                    .read_json(&name)
                    .map(|entry| entry.to_string())
                    .ok_or_else(|| io::Error::other(format!("{name} is missing")))
            })),
        }
    }

    /// Continue the journal after its intact lines.
    pub fn resume_journal(&self, good_len: u64) -> Journal {
        match self {
            ExportDirectory::Server(dir) => {
                let journal = dir
                    .open_append(OsStr::new(PROGRESS))
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                // A line cut short by a crash is dropped; its chunk is redone.
                journal
                    .set_len(good_len)
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                Journal::File(journal)
            }
            ExportDirectory::Prefix(_) => Journal::Objects,
        }
    }

    /// Start a journal afresh with `header`.
    pub fn new_journal(&self, header: &Value) -> Journal {
        // A journal whose header never made it is stale.
        self.remove_journal();
        self.refuse_journal_left();
        match self {
            ExportDirectory::Server(dir) => {
                let mut journal = dir
                    .open_append(OsStr::new(PROGRESS))
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                append_line(&mut journal, header);
                dir.sync().unwrap_or_else(|e| raise_io(e, PROGRESS));
                Journal::File(journal)
            }
            ExportDirectory::Prefix(prefix) => {
                prefix.put_json(PROGRESS_HEADER, header);
                Journal::Objects
            }
        }
    }

    /// Record entry `index` in the journal: from then on it counts as done.
    pub fn append_journal(&self, journal: &mut Journal, index: usize, entry: &Value) {
        match (self, journal) {
            (_, Journal::File(file)) => append_line(file, entry),
            (ExportDirectory::Prefix(prefix), Journal::Objects) => {
                prefix.put_json(&journal_entry_name(index), entry)
            }
            (ExportDirectory::Server(_), Journal::Objects) => {
                unreachable!("a server directory's journal is a file")
            }
        }
    }

    /// `58030` when journal objects are still under the prefix (their
    /// removal failed): a new journal must not take them up.
    fn refuse_journal_left(&self) {
        if let ExportDirectory::Prefix(prefix) = self {
            let left = prefix
                .names_under("progress")
                .into_iter()
                .find(|name| is_journal_object(name));
            if let Some(name) = left {
                raise(
                    PgSqlErrorCode::ERRCODE_IO_ERROR,
                    format!(
                        "could not remove \"{}\", the journal of an earlier export",
                        prefix.uri.join(&name)
                    ),
                    Some("Check that the store accepts DELETE requests, then call again."),
                );
            }
        }
    }

    /// Remove the journal (best effort: it is only read to resume).
    pub fn remove_journal(&self) {
        match self {
            ExportDirectory::Server(dir) => {
                let _ = dir.unlink(OsStr::new(PROGRESS));
            }
            // A client of its own: the session's stops at a cancel, and
            // this runs inside the commit point, where one is no reason to
            // leave the journal.
            ExportDirectory::Prefix(prefix) => {
                if let Ok(client) = prefix.client().for_finishing(object::upload::FINISH_LIMIT) {
                    let _ =
                        object::delete_under(&client, &prefix.uri, "progress", is_journal_object);
                }
            }
        }
    }

    /// Write the manifest of the export `export_id` with `write` (which may
    /// stream it) and put it in place: the commit point. With `overwrite`,
    /// the parts of the export it replaced are removed afterwards.
    ///
    /// From just before the manifest is put in place (a rename, or the one
    /// PUT of the whole manifest) to the end, interrupts are held
    /// ([`CommitPoint`]): a cancel or `statement_timeout` cannot make it
    /// unknown whether the export was committed, and once it is, this
    /// returns (the cancel came too late). `on_commit_point` is called right
    /// before: from there on the caller must not remove the export's
    /// parts, since the manifest may list them. A PUT that fails with no
    /// answer is decided by what the store holds afterwards; if that is
    /// not the new manifest the error is raised and the parts stay, for the
    /// next export to the prefix to remove. Replaced parts are removed only
    /// once the new manifest is in place, and so is what `after_commit`
    /// removes (still inside the commit point: it must not raise, and
    /// should stop when a cancel is pending).
    pub fn commit_manifest(
        &self,
        claim: ManifestClaim,
        export_id: &str,
        overwrite: bool,
        write: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
        on_commit_point: &mut dyn FnMut(),
        after_commit: &mut dyn FnMut(),
    ) {
        let own = format!("part-{export_id}-");
        match (self, claim) {
            (ExportDirectory::Server(dir), ManifestClaim::Server(mut partial)) => {
                let file = partial
                    .take_file()
                    .unwrap_or_else(|e| raise_io(e, MANIFEST));
                let mut out = std::io::BufWriter::new(file);
                let file = write(&mut out)
                    .and_then(|_| out.into_inner().map_err(|e| e.into_error()))
                    .unwrap_or_else(|e| raise_io(e, MANIFEST));
                let point = CommitPoint::enter();
                on_commit_point();
                listing::commit_manifest(dir, partial, file, overwrite, |part| {
                    part.starts_with(&own)
                });
                after_commit();
                point.committed();
            }
            (
                ExportDirectory::Prefix(prefix),
                ManifestClaim::Prefix {
                    replaced_parts,
                    lease,
                },
            ) => {
                object::check_lease(&lease, &prefix.uri);
                let uri = prefix.uri.join(MANIFEST);
                // Whole before anything of it leaves: one PUT commits it.
                let mut manifest = Vec::new();
                write(&mut manifest).unwrap_or_else(|e| raise_io(e, MANIFEST));
                let point = CommitPoint::enter();
                on_commit_point();
                let client = object::commit_client(prefix.client());
                if let Err(e) = client.put(&uri, &manifest, overwrite) {
                    if !object::holds(&client, &uri, &manifest) {
                        drop(point);
                        object::raise_store_error(&e, "upload", Some(&uri));
                    }
                }
                for part in replaced_parts
                    .iter()
                    .filter(|p| !p.starts_with(&own) && is_part_file_name(p))
                {
                    // A cancel stops the clean-up, not the export: what is
                    // left, the next export to the prefix removes.
                    if object::cancel_or_exit_pending() {
                        break;
                    }
                    let _ = client.delete(&prefix.uri.join(part));
                }
                after_commit();
                drop(lease);
                point.committed();
            }
            _ => unreachable!("a manifest claim belongs to its own kind of directory"),
        }
    }

    /// The directory `name` (ending with `/`) inside this one, such as a
    /// cluster export's node directory; only under an object prefix: `None`
    /// on the server.
    pub fn child(&self, name: &str) -> Option<ExportDirectory> {
        match self {
            ExportDirectory::Server(_) => None,
            ExportDirectory::Prefix(prefix) => Some(ExportDirectory::Prefix(Prefix {
                uri: prefix.uri.join(name),
                client: prefix.client.clone(),
            })),
        }
    }

    /// The bytes of the small file `name` (at most 64 MiB read); `None`
    /// when there is none. Other failures raise.
    pub fn read_small(&self, name: &str) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut bytes = Vec::new();
        match self.open_file(name) {
            Ok(file) => match file.take(64 << 20).read_to_end(&mut bytes) {
                Ok(_) => Some(bytes),
                Err(e) => raise_io(e, name),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => match self {
                ExportDirectory::Prefix(prefix) => match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<object::client::StoreError>())
                {
                    Some(store) if store.failure == Failure::NotFound => None,
                    Some(store) => {
                        object::raise_store_error(store, "read", Some(&prefix.uri.join(name)))
                    }
                    None => raise_io(e, name),
                },
                ExportDirectory::Server(_) => raise_io(e, name),
            },
        }
    }

    /// Put the small file `name` (replacing one there).
    pub fn write_small(&self, name: &str, bytes: &[u8]) {
        match self {
            ExportDirectory::Server(dir) => {
                let mut partial = PartialFile::create(dir, OsStr::new(name), true);
                let file = partial
                    .take_file()
                    .and_then(|mut f| f.write_all(bytes).map(|_| f))
                    .unwrap_or_else(|e| raise_io(e, name));
                partial.commit(file, true);
            }
            ExportDirectory::Prefix(prefix) => {
                let uri = prefix.uri.join(name);
                prefix
                    .client()
                    .put(&uri, bytes, true)
                    .unwrap_or_else(|e| object::raise_store_error(&e, "write", Some(&uri)));
            }
        }
    }

    /// Put the small object `name` under a prefix (replacing one there),
    /// unless a cancel or terminate is pending. Best effort, never raises:
    /// for bookkeeping after a commit point.
    pub fn try_write_small(&self, name: &str, bytes: &[u8]) {
        if let ExportDirectory::Prefix(prefix) = self {
            if !object::cancel_or_exit_pending() {
                let _ = prefix.client().put(&prefix.uri.join(name), bytes, true);
            }
        }
    }

    /// Remove the file `name` if it is there.
    pub fn remove_file(&self, name: &str) {
        match self {
            ExportDirectory::Server(dir) => match dir.unlink(OsStr::new(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => raise_io(e, name),
                _ => {}
            },
            ExportDirectory::Prefix(prefix) => {
                let uri = prefix.uri.join(name);
                match prefix.client().delete(&uri) {
                    Err(e) if e.failure != Failure::NotFound => {
                        object::raise_store_error(&e, "remove", Some(&uri))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Under a prefix, remove the node directories `directories` (relative
    /// to it) of a cluster export: everything under a run directory
    /// (`node-<id>/<export id>/`, multipart uploads included), and in a node
    /// directory itself (exports before 0.4.0) only the files an export
    /// writes there. One listing of the node directories and one of the
    /// uploads, then a request per object removed; stops when a cancel or
    /// terminate is pending. Best effort, never raises (what is left, the
    /// next export removes).
    pub fn remove_node_directories(&self, directories: &[String]) {
        let ExportDirectory::Prefix(prefix) = self else {
            return;
        };
        if directories.is_empty() {
            return;
        }
        let nested = |directory: &str| directory.trim_end_matches('/').contains('/');
        let removed = |name: &str| {
            directories.iter().any(|directory| {
                name.strip_prefix(directory.as_str()).is_some_and(|file| {
                    nested(directory)
                        || (!file.contains('/')
                            && (is_part_file_name(file)
                                || file == MANIFEST
                                || file == object::LEASE
                                || is_journal_object(file)))
                })
            })
        };
        let _ = object::delete_under(prefix.client(), &prefix.uri, "node-", |name| {
            !object::cancel_or_exit_pending() && removed(name)
        });
        object::abort_uploads_under(prefix.client(), &prefix.uri, &|name| {
            directories
                .iter()
                .any(|directory| nested(directory) && name.starts_with(directory.as_str()))
        });
    }

    /// Remove what the export `export_id` left here when the process that
    /// ran it may be gone: its parts, and under a prefix its uploads in
    /// progress and its lease. Never raises.
    pub fn remove_export_leftovers(&self, export_id: &str) {
        match self {
            ExportDirectory::Server(_) => self.remove_parts_of(export_id),
            ExportDirectory::Prefix(prefix) => {
                object::remove_export_leftovers(&prefix.uri, export_id)
            }
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
                    if export_id_of_part(name.as_bytes()) == Some(export_id.as_bytes()) {
                        let _ = file::remove_if_abandoned(dir, &name);
                    }
                }
            }
            ExportDirectory::Prefix(prefix) => object::remove_parts_of(&prefix.uri, export_id),
        }
    }
}
