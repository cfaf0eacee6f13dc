//! Streaming upload of one object: the export's bytes are cut into parts
//! as they arrive and handed to upload threads, so encoding and uploading
//! overlap and at most a few parts are in memory. Small objects go up in
//! one PUT. The object appears only when the multipart upload completes;
//! dropping an unfinished upload (an error, a cancel) aborts it, and
//! [`abort_live_uploads`] does the same when the process exits.
//! The threads only talk to the store; they never call into PostgreSQL.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::client::{Client, Failure, StoreError};
use super::uri::ObjectUri;

/// S3's ceiling on the parts of one upload.
pub const MAX_PARTS: u32 = 10_000;
/// S3's floor on every part but the last.
pub const MIN_PART_BYTES: usize = 5 << 20;
/// Part buffers alive at once stay within this (or two parts, if larger).
const BUFFER_BUDGET: usize = 32 << 20;
/// Threads uploading parts.
const UPLOAD_THREADS: usize = 2;
/// How long the request that makes an object appear goes on once a cancel
/// or terminate is pending (it is not cut short at once: see `finish`);
/// until then only the store's timeouts bound it.
pub const FINISH_LIMIT: Duration = Duration::from_secs(30);
/// Parts per size step: the part size doubles after 3,334 and 6,667 parts,
/// so 10,000 parts hold about 7 x 3,334 base-size parts (195 GB at 8 MiB).
const PARTS_PER_STEP: u32 = 3_334;

/// The size of part `number` (from 1) for a base part size.
pub fn part_size(base: usize, number: u32) -> usize {
    base << ((number.saturating_sub(1)) / PARTS_PER_STEP).min(2)
}

/// Largest object the schedule allows for a base part size.
pub fn max_object_bytes(base: usize) -> u64 {
    (1..=MAX_PARTS).map(|n| part_size(base, n) as u64).sum()
}

fn buffers_for(size: usize) -> usize {
    (BUFFER_BUDGET / size.max(1)).max(2)
}

#[derive(Default)]
struct Shared {
    error: Mutex<Option<StoreError>>,
    etags: Mutex<Vec<(u32, String)>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn fail(&self, error: StoreError) {
        lock(&self.error).get_or_insert(error);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn error(&self) -> Option<StoreError> {
        lock(&self.error).clone()
    }
}

struct Live {
    serial: u64,
    client: Arc<Client>,
    uri: ObjectUri,
    upload_id: String,
    shared: Arc<Shared>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
static SERIAL: AtomicU64 = AtomicU64::new(1);

/// Abort every unfinished multipart upload of this process: for exit
/// paths that do not unwind (FATAL, shutdown). Never panics.
pub fn abort_live_uploads() {
    let live: Vec<Live> = std::mem::take(&mut *lock(&LIVE));
    for upload in live {
        upload.shared.stop.store(true, Ordering::SeqCst);
        upload.client.stop();
        if let Ok(cleanup) = upload.client.for_cleanup() {
            let _ = cleanup.abort_multipart(&upload.uri, &upload.upload_id);
        }
    }
}

fn unregister(serial: u64) {
    lock(&LIVE).retain(|l| l.serial != serial);
}

struct Multipart {
    upload_id: String,
    serial: u64,
    jobs: Option<SyncSender<(u32, Vec<u8>)>>,
    spare: Receiver<Vec<u8>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    buffers: usize,
}

/// An object being written. `io::Write`; call [`ObjectUpload::finish`] to
/// make it appear.
pub struct ObjectUpload {
    client: Arc<Client>,
    uri: ObjectUri,
    overwrite: bool,
    base: usize,
    interrupt: fn(),
    current: Vec<u8>,
    /// The number `current` will upload as.
    number: u32,
    multipart: Option<Multipart>,
    finished: bool,
}

/// An upload failure as an `io::Error` whose message names the object.
fn to_io(uri: &ObjectUri, error: StoreError) -> io::Error {
    io::Error::other(StoreError {
        failure: error.failure,
        detail: format!("\"{uri}\": {}", error.detail),
    })
}

/// The error the upload threads stopped on.
fn why_stopped(shared: &Shared, uri: &ObjectUri) -> io::Error {
    let error = shared
        .error()
        .unwrap_or_else(|| StoreError::new(Failure::Other, "the upload threads stopped"));
    to_io(uri, error)
}

impl ObjectUpload {
    /// `interrupt` is called while waiting for the upload threads: it may
    /// raise (unwind) to cancel, after which dropping aborts the upload.
    pub fn new(
        client: Arc<Client>,
        uri: ObjectUri,
        overwrite: bool,
        base: usize,
        interrupt: fn(),
    ) -> ObjectUpload {
        ObjectUpload {
            client,
            uri,
            overwrite,
            base: base.max(MIN_PART_BYTES),
            interrupt,
            current: Vec::new(),
            number: 1,
            multipart: None,
            finished: false,
        }
    }

    fn target(&self) -> usize {
        part_size(self.base, self.number)
    }

    fn start_multipart(&mut self) -> io::Result<()> {
        let upload_id = self
            .client
            .create_multipart(&self.uri)
            .map_err(|e| to_io(&self.uri, e))?;
        let shared = Arc::new(Shared::default());
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        lock(&LIVE).push(Live {
            serial,
            client: self.client.clone(),
            uri: self.uri.clone(),
            upload_id: upload_id.clone(),
            shared: shared.clone(),
        });
        let (job_tx, job_rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(buffers_for(MIN_PART_BYTES));
        let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..UPLOAD_THREADS)
            .map(|_| {
                let (jobs, spare, shared) = (job_rx.clone(), spare_tx.clone(), shared.clone());
                let (client, uri, id) = (self.client.clone(), self.uri.clone(), upload_id.clone());
                std::thread::spawn(move || loop {
                    let job = lock(&jobs).recv();
                    let Ok((number, mut part)) = job else { return };
                    if !shared.stop.load(Ordering::SeqCst) {
                        match client.upload_part(&uri, &id, number, &part) {
                            Ok(etag) => lock(&shared.etags).push((number, etag)),
                            Err(e) => shared.fail(e),
                        }
                    }
                    part.clear();
                    let _ = spare.send(part);
                })
            })
            .collect();
        self.multipart = Some(Multipart {
            upload_id,
            serial,
            jobs: Some(job_tx),
            spare: spare_rx,
            workers,
            shared,
            buffers: 1,
        });
        Ok(())
    }

    /// Hand `current` to the upload threads and get a buffer for the next part.
    fn ship(&mut self) -> io::Result<()> {
        if self.multipart.is_none() {
            self.start_multipart()?;
        }
        if self.number > MAX_PARTS {
            return Err(to_io(
                &self.uri,
                StoreError::new(
                    Failure::TooLarge,
                    format!(
                        "the object would need more than {MAX_PARTS} parts (at most {} bytes with this part size); raise pg_stream_export.object_part_size",
                        max_object_bytes(self.base)
                    ),
                ),
            ));
        }
        let next_size = part_size(self.base, self.number + 1);
        let (interrupt, uri) = (self.interrupt, &self.uri);
        let Some(multipart) = self.multipart.as_mut() else {
            return Err(io::Error::other("no multipart upload"));
        };
        if let Some(error) = multipart.shared.error() {
            return Err(to_io(uri, error));
        }
        let mut next = if multipart.buffers < buffers_for(next_size) {
            multipart.buffers += 1;
            Vec::new()
        } else {
            loop {
                match multipart.spare.recv_timeout(Duration::from_millis(50)) {
                    Ok(buffer) => break buffer,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(error) = multipart.shared.error() {
                            return Err(to_io(uri, error));
                        }
                        interrupt();
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(why_stopped(&multipart.shared, uri))
                    }
                }
            }
        };
        next.reserve(next_size);
        let full = std::mem::replace(&mut self.current, next);
        let sent = multipart
            .jobs
            .as_ref()
            .map(|jobs| jobs.send((self.number, full)).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(why_stopped(&multipart.shared, uri));
        }
        self.number += 1;
        Ok(())
    }

    /// Upload what is left and make the object appear. `at_commit` is
    /// called once everything but the one request that makes the object
    /// appear (the PUT, or the completion of the multipart upload) is done,
    /// just before that request: a cancel before it stops the upload; the
    /// request itself goes on for [`FINISH_LIMIT`] after a cancel or
    /// terminate (see [`Client::for_finishing`]), and a PUT cut short then
    /// is decided by what the store holds.
    pub fn finish(mut self, at_commit: &mut dyn FnMut()) -> io::Result<()> {
        let result = self.complete(at_commit);
        if result.is_ok() {
            self.finished = true;
            if let Some(multipart) = &self.multipart {
                unregister(multipart.serial);
            }
        }
        result
    }

    fn complete(&mut self, at_commit: &mut dyn FnMut()) -> io::Result<()> {
        let uri = &self.uri;
        if self.multipart.is_none() {
            at_commit();
            let finishing = self
                .client
                .for_finishing(FINISH_LIMIT)
                .map_err(|e| to_io(uri, e))?;
            return match finishing.put(uri, &self.current, self.overwrite) {
                // Cut short with no answer: what the store holds decides.
                Err(e) if e.failure == Failure::Stopped => {
                    if super::holds(&finishing, uri, &self.current) {
                        Ok(())
                    } else {
                        Err(to_io(uri, e))
                    }
                }
                other => other.map_err(|e| to_io(uri, e)),
            };
        }
        if !self.current.is_empty() {
            self.ship()?;
        }
        let (interrupt, uri) = (self.interrupt, &self.uri);
        let Some(multipart) = self.multipart.as_mut() else {
            return Err(io::Error::other("no multipart upload"));
        };
        multipart.jobs = None;
        // Wait for the threads, still answering a cancel meanwhile.
        while multipart.workers.iter().any(|w| !w.is_finished()) {
            if multipart
                .spare
                .recv_timeout(Duration::from_millis(50))
                .is_err()
            {
                interrupt();
            }
        }
        for worker in multipart.workers.drain(..) {
            let _ = worker.join();
        }
        if let Some(error) = multipart.shared.error() {
            return Err(to_io(uri, error));
        }
        let mut parts = std::mem::take(&mut *lock(&multipart.shared.etags));
        parts.sort_by_key(|(number, _)| *number);
        if parts.len() as u32 != self.number - 1 {
            return Err(io::Error::other("a part of the upload is missing"));
        }
        at_commit();
        let finishing = self
            .client
            .for_finishing(FINISH_LIMIT)
            .map_err(|e| to_io(uri, e))?;
        finishing
            .complete_multipart(uri, &multipart.upload_id, &parts, self.overwrite)
            .map_err(|e| to_io(uri, e))
    }
}

impl io::Write for ObjectUpload {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let written = data.len();
        while !data.is_empty() {
            let target = self.target();
            if self.current.capacity() == 0 {
                self.current.reserve(target.min(data.len().max(1 << 20)));
            }
            let take = (target - self.current.len()).min(data.len());
            self.current.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.current.len() == target {
                self.ship()?;
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectUpload {
    /// Abort an unfinished upload. Never raises: this runs while an error
    /// unwinds. The client is stopped, so the threads' requests in flight
    /// end at once; the abort goes through a clean-up client with short
    /// timeouts, so a stalled store cannot hold the error up.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(mut multipart) = self.multipart.take() {
            multipart.shared.stop.store(true, Ordering::SeqCst);
            multipart.jobs = None;
            self.client.stop();
            for worker in multipart.workers.drain(..) {
                let _ = worker.join();
            }
            if let Ok(cleanup) = self.client.for_cleanup() {
                let _ = cleanup.abort_multipart(&self.uri, &multipart.upload_id);
            }
            unregister(multipart.serial);
        }
    }
}

/// The failure an `io::Error` from an upload carries, if any.
pub fn store_error_of(error: &io::Error) -> Option<&StoreError> {
    error.get_ref().and_then(|e| e.downcast_ref::<StoreError>())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn part_sizes_grow_to_stay_under_the_part_ceiling() {
        let base = 8 << 20;
        assert_eq!(part_size(base, 1), base);
        assert_eq!(part_size(base, 3_334), base);
        assert_eq!(part_size(base, 3_335), 2 * base);
        assert_eq!(part_size(base, 6_669), 4 * base);
        assert_eq!(part_size(base, 10_000), 4 * base);
        // 3,334 + 2 x 3,334 + 4 x 3,332 base parts.
        assert_eq!(
            max_object_bytes(base),
            (3_334 + 2 * 3_334 + 4 * 3_332) * base as u64
        );
        assert!(max_object_bytes(base) > 180_000_000_000);
    }

    #[test]
    fn buffers_stay_in_the_budget() {
        assert_eq!(buffers_for(8 << 20), 4);
        assert_eq!(buffers_for(16 << 20), 2);
        assert_eq!(buffers_for(32 << 20), 2);
        assert!(buffers_for(5 << 20) * (5 << 20) <= BUFFER_BUDGET);
    }
}
