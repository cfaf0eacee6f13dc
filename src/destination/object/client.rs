//! A small blocking S3 client: the requests an export needs, signed with
//! SigV4, over ureq. It never calls into PostgreSQL, so upload threads
//! use it freely.

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::config::StoreConfig;
use super::sigv4;
use super::uri::ObjectUri;

/// What went wrong, as far as the caller must tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    NoSuchBucket,
    NotFound,
    AccessDenied,
    BadCredentials,
    /// A conditional write found the object there (`If-None-Match`).
    Exists,
    /// No answer: refused, reset, timed out, name not resolved.
    Unreachable,
    /// More than the store takes (the part ceiling).
    TooLarge,
    /// The client was stopped (a cancel, a timeout, the backend exiting).
    Stopped,
    Other,
}

#[derive(Clone, Debug)]
pub struct StoreError {
    pub failure: Failure,
    pub detail: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    pub fn new(failure: Failure, detail: impl Into<String>) -> StoreError {
        StoreError {
            failure,
            detail: detail.into(),
        }
    }
}

/// The text of the first `<tag>` element of an XML document, unescaped.
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    xml_all(xml, tag).into_iter().next()
}

/// The texts of every `<tag>` element, unescaped.
pub fn xml_all(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        found.push(
            after[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&#34;", "\"")
                .replace("&amp;", "&"),
        );
        rest = &after[end + close.len()..];
    }
    found
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Classify an S3 error response.
pub fn classify(status: u16, code: &str) -> Failure {
    match code {
        "NoSuchBucket" => Failure::NoSuchBucket,
        "NoSuchKey" | "NoSuchUpload" => Failure::NotFound,
        "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "InvalidToken"
        | "TokenRefreshRequired"
        | "InvalidSecurity" => Failure::BadCredentials,
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => Failure::AccessDenied,
        "PreconditionFailed" | "ConditionalRequestConflict" => Failure::Exists,
        _ => match status {
            404 => Failure::NotFound,
            403 => Failure::AccessDenied,
            412 => Failure::Exists,
            _ => Failure::Other,
        },
    }
}

/// Retries for answers that say "try again" and for lost connections.
const ATTEMPTS: u32 = 3;

/// What a conditional write needs to find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// No object at the key (`If-None-Match: *`).
    Absent,
    /// The object with this ETag (`If-Match`).
    Matches(String),
}

/// How long the store may keep a request waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// To open a connection.
    pub connect: Duration,
    /// For any one read or write of a request or its answer: a store that
    /// accepts nothing or answers nothing for this long has failed.
    pub io: Duration,
}

impl Timeouts {
    /// For clean-up after a failure (aborting an upload, deleting parts),
    /// which runs while an error unwinds and must not keep it waiting.
    pub const CLEANUP: Timeouts = Timeouts {
        connect: Duration::from_secs(1),
        io: Duration::from_secs(1),
    };
}

/// How often the watchdog asks whether the requests must stop.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

pub struct Client {
    agent: ureq::Agent,
    config: StoreConfig,
    timeouts: Timeouts,
    /// Set once the client is stopped: requests in flight fail at once and
    /// new ones are refused.
    stopped: Arc<AtomicBool>,
    watchdog: Option<Watchdog>,
}

/// A thread that stops the client's requests when `stop_wanted` says so.
struct Watchdog {
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Drop for Client {
    /// Joins the watchdog (it wakes at once).
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.done.store(true, Ordering::SeqCst);
            watchdog.thread.thread().unpark();
            let _ = watchdog.thread.join();
        }
    }
}

/// A request's answer: status, the headers we read, and the body.
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub content_length: Option<u64>,
    pub body: ureq::Body,
}

impl Client {
    pub fn new(config: StoreConfig, timeouts: Timeouts) -> Result<Client, StoreError> {
        if let Some(endpoint) = &config.endpoint {
            if endpoint.starts_with("http://") && !config.allow_http {
                return Err(StoreError::new(
                    Failure::Other,
                    format!(
                        "endpoint {endpoint} is plain HTTP; set AWS_ALLOW_HTTP=true to allow it"
                    ),
                ));
            }
        }
        // A stop ends a connect still in progress too (see `connect`).
        let stopped = Arc::new(AtomicBool::new(false));
        let agent = ureq::Agent::with_parts(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_connect(Some(timeouts.connect))
                .timeout_per_read(Some(timeouts.io))
                .timeout_per_write(Some(timeouts.io))
                .user_agent("pg_stream_export")
                .build(),
            super::connect::connector(stopped.clone()),
            ureq::unversioned::resolver::DefaultResolver::default(),
        );
        Ok(Client {
            agent,
            config,
            timeouts,
            stopped,
            watchdog: None,
        })
    }

    /// Stop every request of this client as soon as `stop_wanted` returns
    /// true; it is asked every 20 ms on a thread of its own, so it must be
    /// cheap and must not call into PostgreSQL.
    pub fn stopping_when(mut self, stop_wanted: impl Fn() -> bool + Send + 'static) -> Client {
        let done = Arc::new(AtomicBool::new(false));
        let (agent, stopped, finished) = (self.agent.clone(), self.stopped.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !finished.load(Ordering::SeqCst) {
                if stop_wanted() {
                    stopped.store(true, Ordering::SeqCst);
                    agent.shutdown();
                    return;
                }
                std::thread::park_timeout(WATCH_INTERVAL);
            }
        });
        self.watchdog = Some(Watchdog { done, thread });
        self
    }

    /// Stop the client: requests in flight (on any thread) fail at once,
    /// with [`Failure::Stopped`], and so do later ones.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.agent.clone().shutdown();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// A client of the same store with its own connections and `timeouts`,
    /// and no watchdog.
    pub fn with_timeouts(&self, timeouts: Timeouts) -> Result<Client, StoreError> {
        Client::new(self.config.clone(), timeouts)
    }

    /// A client of the same store for the one request that makes an object
    /// appear: a cancel or terminate does not cut it short at once (a
    /// request cut short may still complete at the store later, after the
    /// clean-up looked), only once one has been pending for `limit`. Its
    /// own connections, this client's timeouts.
    pub fn for_finishing(&self, limit: Duration) -> Result<Client, StoreError> {
        let pending_since = std::sync::Mutex::new(None::<std::time::Instant>);
        Ok(
            Client::new(self.config.clone(), self.timeouts)?.stopping_when(move || {
                if !super::cancel_or_exit_pending() {
                    return false;
                }
                let mut since = pending_since.lock().unwrap_or_else(|p| p.into_inner());
                since.get_or_insert_with(std::time::Instant::now).elapsed() >= limit
            }),
        )
    }

    /// A client of the same store for clean-up once this one stopped: its
    /// own connections, short timeouts, no watchdog.
    pub fn for_cleanup(&self) -> Result<Client, StoreError> {
        Client::new(self.config.clone(), Timeouts::CLEANUP)
    }

    fn stopped_error(&self) -> StoreError {
        StoreError::new(Failure::Stopped, "the request was stopped")
    }

    /// Wait `pause` before a retry, or less if the client is stopped.
    fn back_off(&self, pause: Duration) {
        let until = std::time::Instant::now() + pause;
        while !self.is_stopped() {
            let now = std::time::Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(WATCH_INTERVAL));
        }
    }

    /// Scheme, authority and path of `uri` (the key encoded).
    fn location(&self, uri: &ObjectUri) -> (String, String, String) {
        let key = sigv4::uri_encode(&uri.key, true);
        let (scheme, host) = match &self.config.endpoint {
            Some(endpoint) => {
                let (scheme, host) = endpoint.split_once("://").unwrap_or(("https", endpoint));
                (scheme.to_string(), host.to_string())
            }
            None => (
                "https".to_string(),
                format!("s3.{}.amazonaws.com", self.config.region),
            ),
        };
        // Dotted bucket names do not match a wildcard TLS certificate.
        if self.config.path_style || uri.bucket.contains('.') {
            (scheme, host, format!("/{}/{key}", uri.bucket))
        } else {
            (scheme, format!("{}.{host}", uri.bucket), format!("/{key}"))
        }
    }

    fn send_once(
        &self,
        method: &str,
        uri: &ObjectUri,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
        body: &[u8],
        payload_sha256: &str,
    ) -> Result<Answer, StoreError> {
        let (scheme, host, path) = self.location(uri);
        let query_text = sigv4::canonical_query(query);
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let amz_date = sigv4::amz_date(seconds);
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), host.clone()),
            ("x-amz-content-sha256".into(), payload_sha256.to_string()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        if let Some(token) = &self.config.credentials.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        for (name, value) in extra {
            headers.push((name.to_string(), value.to_string()));
        }
        let authorization = sigv4::authorization(
            &self.config.credentials,
            &self.config.region,
            method,
            &path,
            &query_text,
            &headers,
            payload_sha256,
            &amz_date,
        );
        let url = if query_text.is_empty() {
            format!("{scheme}://{host}{path}")
        } else {
            format!("{scheme}://{host}{path}?{query_text}")
        };
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request = request.header("authorization", authorization);
        let request = request
            .body(body)
            .map_err(|e| StoreError::new(Failure::Other, format!("invalid request: {e}")))?;
        let response = self.agent.run(request).map_err(|e| {
            StoreError::new(
                Failure::Unreachable,
                format!("object store at {scheme}://{host} not reachable: {e}"),
            )
        })?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = header("etag");
        let content_length = header("content-length").and_then(|v| v.parse().ok());
        Ok(Answer {
            status,
            etag,
            content_length,
            body: response.into_body(),
        })
    }

    /// Send a request, retrying lost connections and 5xx answers; a non-2xx
    /// answer becomes a [`StoreError`].
    pub fn send(
        &self,
        method: &str,
        uri: &ObjectUri,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, StoreError> {
        let payload = if body.is_empty() {
            sigv4::EMPTY_SHA256.to_string()
        } else {
            sigv4::sha256_hex(body)
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            if self.is_stopped() {
                return Err(self.stopped_error());
            }
            let result = self.send_once(method, uri, query, extra, body, &payload);
            if result.is_err() && self.is_stopped() {
                return Err(self.stopped_error());
            }
            let retry = match &result {
                Err(e) => e.failure == Failure::Unreachable,
                Ok(answer) => matches!(answer.status, 500 | 502 | 503 | 504),
            };
            if retry && attempt < ATTEMPTS {
                // Back off before the next attempt (not a synchronisation);
                // a stop ends the wait.
                self.back_off(Duration::from_millis(100 << (2 * attempt)));
                continue;
            }
            let mut answer = result?;
            if (200..300).contains(&answer.status) {
                return Ok(answer);
            }
            let mut text = String::new();
            if method != "HEAD" {
                let _ = answer
                    .body
                    .with_config()
                    .limit(1 << 16)
                    .reader()
                    .read_to_string(&mut text);
            }
            let code = xml_text(&text, "Code").unwrap_or_default();
            let message = xml_text(&text, "Message").unwrap_or_default();
            let failure = classify(answer.status, &code);
            let detail = match (code.is_empty(), message.is_empty()) {
                (true, _) => format!("HTTP {}", answer.status),
                (false, true) => format!("{code} (HTTP {})", answer.status),
                (false, false) => format!("{code}: {message} (HTTP {})", answer.status),
            };
            return Err(StoreError::new(failure, detail));
        }
    }

    /// The object's size, or `None` if there is none.
    pub fn head(&self, uri: &ObjectUri) -> Result<Option<u64>, StoreError> {
        match self.send("HEAD", uri, &[], &[], b"") {
            Ok(answer) => Ok(Some(answer.content_length.unwrap_or(0))),
            Err(e) if e.failure == Failure::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn condition(overwrite: bool) -> Vec<(&'static str, &'static str)> {
        if overwrite {
            vec![]
        } else {
            vec![("if-none-match", "*")]
        }
    }

    /// One PUT of a whole object on a condition the store checks
    /// atomically (`Failure::Exists` when it does not hold); its ETag.
    pub fn put_if(
        &self,
        uri: &ObjectUri,
        body: &[u8],
        condition: &Condition,
    ) -> Result<Option<String>, StoreError> {
        let header = match condition {
            Condition::Absent => vec![("if-none-match", "*")],
            Condition::Matches(etag) => vec![("if-match", etag.as_str())],
        };
        self.send("PUT", uri, &[], &header, body)
            .map(|answer| answer.etag)
    }

    /// A small object's text and ETag; `None` when there is none.
    pub fn get_small(
        &self,
        uri: &ObjectUri,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        let mut answer = match self.send("GET", uri, &[], &[], b"") {
            Ok(answer) => answer,
            Err(e) if e.failure == Failure::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = answer.etag.clone();
        let text = read_small(&mut answer).map_err(|e| self.read_failure(e))?;
        Ok(Some((text, etag)))
    }

    /// The multipart uploads in progress under `prefix`: (key, upload id).
    pub fn list_uploads(&self, prefix: &ObjectUri) -> Result<Vec<(String, String)>, StoreError> {
        let bucket = ObjectUri {
            bucket: prefix.bucket.clone(),
            key: String::new(),
        };
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        loop {
            let mut query = vec![("uploads", ""), ("prefix", prefix.key.as_str())];
            if !key_marker.is_empty() {
                query.push(("key-marker", key_marker.as_str()));
                query.push(("upload-id-marker", id_marker.as_str()));
            }
            let mut answer = self.send("GET", &bucket, &query, &[], b"")?;
            let text = read_small(&mut answer).map_err(|e| self.read_failure(e))?;
            for upload in xml_all(&text, "Upload") {
                if let (Some(key), Some(id)) =
                    (xml_text(&upload, "Key"), xml_text(&upload, "UploadId"))
                {
                    uploads.push((key, id));
                }
            }
            if xml_text(&text, "IsTruncated").as_deref() != Some("true") {
                return Ok(uploads);
            }
            key_marker = xml_text(&text, "NextKeyMarker").unwrap_or_default();
            id_marker = xml_text(&text, "NextUploadIdMarker").unwrap_or_default();
            if key_marker.is_empty() {
                return Ok(uploads);
            }
        }
    }

    /// One PUT of a whole object.
    pub fn put(&self, uri: &ObjectUri, body: &[u8], overwrite: bool) -> Result<(), StoreError> {
        self.send("PUT", uri, &[], &Self::condition(overwrite), body)
            .map(|_| ())
    }

    pub fn create_multipart(&self, uri: &ObjectUri) -> Result<String, StoreError> {
        let mut answer = self.send("POST", uri, &[("uploads", "")], &[], b"")?;
        let text = read_small(&mut answer).map_err(|e| self.read_failure(e))?;
        xml_text(&text, "UploadId").ok_or_else(|| {
            StoreError::new(
                Failure::Other,
                "CreateMultipartUpload answered without an UploadId",
            )
        })
    }

    /// Upload part `number` (from 1); returns its ETag.
    pub fn upload_part(
        &self,
        uri: &ObjectUri,
        upload_id: &str,
        number: u32,
        body: &[u8],
    ) -> Result<String, StoreError> {
        let number = number.to_string();
        let answer = self.send(
            "PUT",
            uri,
            &[("partNumber", &number), ("uploadId", upload_id)],
            &[],
            body,
        )?;
        answer
            .etag
            .ok_or_else(|| StoreError::new(Failure::Other, "UploadPart answered without an ETag"))
    }

    pub fn complete_multipart(
        &self,
        uri: &ObjectUri,
        upload_id: &str,
        parts: &[(u32, String)],
        overwrite: bool,
    ) -> Result<(), StoreError> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (number, etag) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag></Part>",
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let mut answer = self.send(
            "POST",
            uri,
            &[("uploadId", upload_id)],
            &Self::condition(overwrite),
            xml.as_bytes(),
        )?;
        // A 200 answer can still carry an error.
        let text = read_small(&mut answer).map_err(|e| self.read_failure(e))?;
        match xml_text(&text, "Code") {
            Some(code) if text.contains("<Error>") => Err(StoreError::new(
                classify(200, &code),
                format!("{code}: {}", xml_text(&text, "Message").unwrap_or_default()),
            )),
            _ => Ok(()),
        }
    }

    pub fn abort_multipart(&self, uri: &ObjectUri, upload_id: &str) -> Result<(), StoreError> {
        match self.send("DELETE", uri, &[("uploadId", upload_id)], &[], b"") {
            Err(e) if e.failure == Failure::NotFound => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// A reader of the object's bytes.
    pub fn get(&self, uri: &ObjectUri) -> Result<impl Read, StoreError> {
        let answer = self.send("GET", uri, &[], &[], b"")?;
        Ok(answer.body.into_with_config().limit(u64::MAX).reader())
    }

    pub fn delete(&self, uri: &ObjectUri) -> Result<(), StoreError> {
        self.send("DELETE", uri, &[], &[], b"").map(|_| ())
    }

    /// The keys under `prefix` (all pages).
    pub fn list(&self, prefix: &ObjectUri) -> Result<Vec<String>, StoreError> {
        let bucket = ObjectUri {
            bucket: prefix.bucket.clone(),
            key: String::new(),
        };
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2"), ("prefix", prefix.key.as_str())];
            if let Some(t) = &token {
                query.push(("continuation-token", t.as_str()));
            }
            let mut answer = self.send("GET", &bucket, &query, &[], b"")?;
            let text = read_small(&mut answer).map_err(|e| self.read_failure(e))?;
            keys.extend(xml_all(&text, "Key"));
            token = xml_text(&text, "NextContinuationToken");
            if token.is_none() || xml_text(&text, "IsTruncated").as_deref() != Some("true") {
                return Ok(keys);
            }
        }
    }
}

fn read_small(answer: &mut Answer) -> Result<String, StoreError> {
    let mut text = String::new();
    answer
        .body
        .with_config()
        .limit(64 << 20)
        .reader()
        .read_to_string(&mut text)
        .map_err(|e| StoreError::new(Failure::Unreachable, format!("reading the answer: {e}")))?;
    Ok(text)
}

impl Client {
    /// A failure of reading an answer's body, as [`Failure::Stopped`] when
    /// the client was stopped meanwhile.
    pub fn read_failure(&self, error: StoreError) -> StoreError {
        if self.is_stopped() {
            self.stopped_error()
        } else {
            error
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn reads_xml_answers() {
        let xml = "<?xml version=\"1.0\"?><ListBucketResult><Contents><Key>a&amp;b</Key></Contents><Contents><Key>c&lt;d</Key></Contents><IsTruncated>false</IsTruncated></ListBucketResult>";
        assert_eq!(xml_all(xml, "Key"), vec!["a&b", "c<d"]);
        assert_eq!(xml_text(xml, "IsTruncated").as_deref(), Some("false"));
        assert_eq!(xml_text(xml, "Nope"), None);
        assert_eq!(xml_escape("\"e&t\""), "&quot;e&amp;t&quot;");
    }

    /// A store that accepts connections and never answers: the accepted
    /// sockets are kept open until the listener thread ends.
    fn silent_store() -> (String, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        (endpoint, listener)
    }

    /// Accept one connection and keep it open, unanswered, for a while
    /// (longer than any test waits for a stop).
    fn hold_one_connection(listener: std::net::TcpListener) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(5));
            drop(socket);
        })
    }

    fn client_of(endpoint: &str, timeouts: Timeouts) -> Client {
        Client::new(
            StoreConfig {
                region: "us-east-1".into(),
                endpoint: Some(endpoint.into()),
                allow_http: true,
                path_style: true,
                credentials: super::super::config::Credentials {
                    access_key_id: "k".into(),
                    secret_access_key: "s".into(),
                    session_token: None,
                },
                profile: None,
            },
            timeouts,
        )
        .unwrap()
    }

    fn uri() -> ObjectUri {
        ObjectUri {
            bucket: "b".into(),
            key: "k".into(),
        }
    }

    #[test]
    fn a_stop_ends_a_stalled_request_at_once() {
        let (endpoint, listener) = silent_store();
        let hold = hold_one_connection(listener);
        let long = Timeouts {
            connect: Duration::from_secs(60),
            io: Duration::from_secs(60),
        };
        let client = Arc::new(client_of(&endpoint, long));
        let stopper = {
            let client = client.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                client.stop();
            })
        };
        let started = std::time::Instant::now();
        let error = client.put(&uri(), b"body", true).unwrap_err();
        assert_eq!(error.failure, Failure::Stopped);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // Later requests are refused without a connection.
        assert_eq!(client.head(&uri()).unwrap_err().failure, Failure::Stopped);
        stopper.join().unwrap();
        hold.join().unwrap();
    }

    #[test]
    fn a_stalled_store_times_out_per_read() {
        let (endpoint, listener) = silent_store();
        let hold = std::thread::spawn(move || {
            // Accept every attempt (three) and answer none.
            let sockets: Vec<_> = (0..ATTEMPTS)
                .map(|_| listener.accept().unwrap().0)
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            drop(sockets);
        });
        let short = Timeouts {
            connect: Duration::from_secs(5),
            io: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        let error = client_of(&endpoint, short).head(&uri()).unwrap_err();
        assert_eq!(error.failure, Failure::Unreachable, "{error}");
        // Three attempts of 200 ms and two back-offs (0.4 s, 1.6 s).
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        hold.join().unwrap();
    }

    #[test]
    fn a_watchdog_stops_the_client_when_asked() {
        use std::sync::atomic::AtomicBool;
        static WANTED: AtomicBool = AtomicBool::new(false);
        let (endpoint, listener) = silent_store();
        let hold = hold_one_connection(listener);
        let long = Timeouts {
            connect: Duration::from_secs(60),
            io: Duration::from_secs(60),
        };
        let client = client_of(&endpoint, long).stopping_when(|| WANTED.load(Ordering::SeqCst));
        let asker = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            WANTED.store(true, Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        assert_eq!(client.head(&uri()).unwrap_err().failure, Failure::Stopped);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(client); // joins the watchdog
        asker.join().unwrap();
        hold.join().unwrap();
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(classify(404, "NoSuchBucket"), Failure::NoSuchBucket);
        assert_eq!(classify(404, ""), Failure::NotFound);
        assert_eq!(
            classify(403, "SignatureDoesNotMatch"),
            Failure::BadCredentials
        );
        assert_eq!(classify(403, "InvalidAccessKeyId"), Failure::BadCredentials);
        assert_eq!(classify(403, "AccessDenied"), Failure::AccessDenied);
        assert_eq!(classify(412, ""), Failure::Exists);
        assert_eq!(classify(500, "InternalError"), Failure::Other);
    }
}
