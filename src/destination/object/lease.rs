//! A lease on an object prefix: one directory or chunked export writes
//! under a prefix at a time. Object stores have no locks, but they check
//! conditional writes atomically: the lease is an object (`lease.json`)
//! put with `If-None-Match: *`, renewed by a thread of its own with
//! `If-Match` on the ETag it last wrote, and deleted when the export ends.
//! A lease not renewed for its time to live (its holder died) may be taken
//! over, again with `If-Match`, so two exports never both hold it.
//! Pure Rust: the thread only talks to the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::client::{Client, Condition, Failure, StoreError};
use super::uri::ObjectUri;

/// The lease object's name under the prefix.
pub const LEASE: &str = "lease.json";

/// Why a lease could not be had.
#[derive(Debug)]
pub enum LeaseError {
    /// Another export holds it: who, and until when (Unix seconds).
    Held {
        holder: String,
        export_id: String,
        expires_at: u64,
    },
    Store(StoreError),
}

impl From<StoreError> for LeaseError {
    fn from(error: StoreError) -> Self {
        LeaseError::Store(error)
    }
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The lease object's text.
fn lease_text(export_id: &str, holder: &str, ttl: Duration) -> String {
    json!({
        "pg_stream_export_lease": 1,
        "export_id": export_id,
        "holder": holder,
        "expires_at": now_seconds() + ttl.as_secs().max(1),
    })
    .to_string()
        + "\n"
}

struct Shared {
    /// The ETag of the lease as this holder last wrote it.
    etag: Mutex<String>,
    /// Set when a renewal found the lease taken, or could not renew it
    /// before it expired.
    lost: AtomicBool,
    done: AtomicBool,
}

/// Leases this process holds, for [`release_live_leases`] at exit.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

struct Live {
    shared: Arc<Shared>,
    client: Arc<Client>,
    uri: ObjectUri,
}

/// Release every lease this process still holds. For an exit on FATAL or
/// shutdown, where no destructor runs: the keeper threads are told to
/// stop, and the leases are deleted through clean-up clients.
pub fn release_live_leases() {
    let live = match LIVE.lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    for lease in live {
        lease.shared.done.store(true, Ordering::SeqCst);
        if !lease.shared.lost.load(Ordering::SeqCst) {
            if let Ok(cleanup) = lease.client.for_cleanup() {
                let _ = cleanup.delete(&lease.uri);
            }
        }
    }
}

/// A held lease; dropping it releases it (see [`Lease::release`]).
pub struct Lease {
    client: Arc<Client>,
    uri: ObjectUri,
    shared: Arc<Shared>,
    keeper: Option<JoinHandle<()>>,
    released: bool,
}

impl Lease {
    /// Take the lease of `prefix` for `export_id`, renewed every third of
    /// `ttl` while held.
    pub fn acquire(
        client: Arc<Client>,
        prefix: &ObjectUri,
        export_id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        let uri = prefix.join(LEASE);
        let text = lease_text(export_id, holder, ttl);
        let taken = match client.put_if(&uri, text.as_bytes(), &Condition::Absent) {
            Ok(etag) => Ok(etag),
            Err(e) if e.failure == Failure::Exists => take_over(&client, &uri, &text),
            Err(e) => Err(e.into()),
        };
        let etag = match taken {
            Ok(etag) => etag,
            Err(e) => {
                // A PUT stopped by a cancel (or lost with the connection)
                // may have reached the store: a lease of this export left
                // behind would keep every export out of the prefix until
                // it expired.
                if matches!(e, LeaseError::Store(_)) {
                    remove_if_ours(&client, &uri, export_id);
                }
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            etag: Mutex::new(etag.unwrap_or_default()),
            lost: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let keeper = {
            let (client, uri, shared) = (client.clone(), uri.clone(), shared.clone());
            let (export_id, holder) = (export_id.to_owned(), holder.to_owned());
            std::thread::spawn(move || keep(&client, &uri, &shared, &export_id, &holder, ttl))
        };
        if let Ok(mut live) = LIVE.lock() {
            live.push(Live {
                shared: shared.clone(),
                client: client.clone(),
                uri: uri.clone(),
            });
        }
        Ok(Lease {
            client,
            uri,
            shared,
            keeper: Some(keeper),
            released: false,
        })
    }

    /// Whether the lease is still this export's.
    pub fn is_held(&self) -> bool {
        !self.shared.lost.load(Ordering::SeqCst)
    }

    /// Stop renewing and delete the lease (unless it was lost: then it is
    /// another export's). Never fails: a lease left behind expires.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|l| !Arc::ptr_eq(&l.shared, &self.shared));
        }
        self.shared.done.store(true, Ordering::SeqCst);
        if let Some(keeper) = self.keeper.take() {
            keeper.thread().unpark();
            let _ = keeper.join();
        }
        if self.is_held() {
            // A cancel pending now stops the session's client within its
            // watchdog's next look, maybe in the middle of this DELETE.
            let client = if self.client.is_stopped() || super::cancel_or_exit_pending() {
                self.client.for_cleanup().ok().map(Arc::new)
            } else {
                Some(self.client.clone())
            };
            if let Some(client) = client {
                let _ = client.delete(&self.uri);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

/// Delete the lease at `uri` if it is `export_id`'s, through a clean-up
/// client (the export's own may be stopped). Never fails.
fn remove_if_ours(client: &Client, uri: &ObjectUri, export_id: &str) {
    let Ok(cleanup) = client.for_cleanup() else {
        return;
    };
    if let Ok(Some((text, _))) = cleanup.get_small(uri) {
        let lease: Value = serde_json::from_str(&text).unwrap_or_default();
        if lease["export_id"].as_str() == Some(export_id) {
            let _ = cleanup.delete(uri);
        }
    }
}

/// The lease at `uri` is there: take it over if it expired, with `If-Match`
/// on the ETag read, so that of two exports taking it over one wins.
fn take_over(client: &Client, uri: &ObjectUri, text: &str) -> Result<Option<String>, LeaseError> {
    let Some((current, etag)) = client.get_small(uri)? else {
        // Released meanwhile: take it as new.
        return client
            .put_if(uri, text.as_bytes(), &Condition::Absent)
            .map_err(|e| held_by_someone(e, "", ""));
    };
    let lease: Value = serde_json::from_str(&current).unwrap_or_default();
    let expires_at = lease["expires_at"].as_u64().unwrap_or(0);
    let holder = lease["holder"].as_str().unwrap_or("?").to_owned();
    let export_id = lease["export_id"].as_str().unwrap_or("?").to_owned();
    if expires_at >= now_seconds() {
        return Err(LeaseError::Held {
            holder,
            export_id,
            expires_at,
        });
    }
    let Some(etag) = etag else {
        return Err(LeaseError::Store(StoreError::new(
            Failure::Other,
            "the store gave the lease object no ETag",
        )));
    };
    client
        .put_if(uri, text.as_bytes(), &Condition::Matches(etag))
        .map_err(|e| held_by_someone(e, &holder, &export_id))
}

fn held_by_someone(error: StoreError, holder: &str, export_id: &str) -> LeaseError {
    if error.failure == Failure::Exists {
        LeaseError::Held {
            holder: holder.to_owned(),
            export_id: export_id.to_owned(),
            expires_at: 0,
        }
    } else {
        LeaseError::Store(error)
    }
}

/// The keeper thread: renew every third of `ttl` until done; a renewal
/// that finds another ETag, or none in time, means the lease is lost.
fn keep(
    client: &Client,
    uri: &ObjectUri,
    shared: &Shared,
    export_id: &str,
    holder: &str,
    ttl: Duration,
) {
    let interval = ttl / 3;
    let mut valid_until = std::time::Instant::now() + ttl;
    loop {
        let next = std::time::Instant::now() + interval;
        while std::time::Instant::now() < next {
            if shared.done.load(Ordering::SeqCst) {
                return;
            }
            std::thread::park_timeout(next - std::time::Instant::now());
        }
        let etag = shared.etag.lock().map(|e| e.clone()).unwrap_or_default();
        let text = lease_text(export_id, holder, ttl);
        match client.put_if(uri, text.as_bytes(), &Condition::Matches(etag)) {
            Ok(etag) => {
                if let Ok(mut current) = shared.etag.lock() {
                    *current = etag.unwrap_or_default();
                }
                valid_until = std::time::Instant::now() + ttl;
            }
            Err(e) if e.failure == Failure::Exists || e.failure == Failure::NotFound => {
                shared.lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(_) if std::time::Instant::now() >= valid_until => {
                shared.lost.store(true, Ordering::SeqCst);
                return;
            }
            // A passing failure: try again at the next interval.
            Err(_) => {}
        }
    }
}
