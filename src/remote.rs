//! Connections to other PostgreSQL servers through libpq, the client
//! library dblink and PL/Proxy use. A connection starts from keyword and
//! value options ([`Params`], never text put together), libpq's parse
//! errors are not passed on (they quote the string), and the secret values
//! a link was started with are masked in every error it reports (which
//! options a role may give is decided by the cluster export, above).
//! Non-blocking throughout: the caller polls, so a cancel or
//! `statement_timeout` is seen at once.
//!
//! Only the backend's own thread uses a [`Link`]; nothing here calls into
//! PostgreSQL. Dropping a link that is still running a query cancels the
//! query and waits, for a bounded time, until the server says it stopped,
//! so that what the query was writing is cleaned up by then.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{Duration, Instant};

#[allow(non_camel_case_types)]
type PGconn = c_void;
#[allow(non_camel_case_types)]
type PGresult = c_void;
#[allow(non_camel_case_types)]
type PGcancel = c_void;

// ConnStatusType, PostgresPollingStatusType and ExecStatusType values.
const CONNECTION_BAD: c_int = 1;
const PGRES_POLLING_FAILED: c_int = 0;
const PGRES_POLLING_READING: c_int = 1;
const PGRES_POLLING_OK: c_int = 3;
const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;
const PG_DIAG_SQLSTATE: c_int = b'C' as c_int;
const PG_DIAG_MESSAGE_PRIMARY: c_int = b'M' as c_int;
const PG_DIAG_MESSAGE_DETAIL: c_int = b'D' as c_int;
const PG_DIAG_MESSAGE_HINT: c_int = b'H' as c_int;
const PG_DIAG_CONTEXT: c_int = b'W' as c_int;

#[link(name = "pq")]
extern "C" {
    fn PQconnectStartParams(
        keywords: *const *const c_char,
        values: *const *const c_char,
        expand_dbname: c_int,
    ) -> *mut PGconn;
    fn PQconnectPoll(conn: *mut PGconn) -> c_int;
    fn PQstatus(conn: *const PGconn) -> c_int;
    fn PQerrorMessage(conn: *const PGconn) -> *const c_char;
    fn PQsocket(conn: *const PGconn) -> c_int;
    fn PQsetnonblocking(conn: *mut PGconn, arg: c_int) -> c_int;
    fn PQsendQueryParams(
        conn: *mut PGconn,
        command: *const c_char,
        n_params: c_int,
        param_types: *const u32,
        param_values: *const *const c_char,
        param_lengths: *const c_int,
        param_formats: *const c_int,
        result_format: c_int,
    ) -> c_int;
    fn PQflush(conn: *mut PGconn) -> c_int;
    fn PQconsumeInput(conn: *mut PGconn) -> c_int;
    fn PQisBusy(conn: *mut PGconn) -> c_int;
    fn PQgetResult(conn: *mut PGconn) -> *mut PGresult;
    fn PQresultStatus(res: *const PGresult) -> c_int;
    fn PQresultErrorField(res: *const PGresult, field: c_int) -> *const c_char;
    fn PQresultErrorMessage(res: *const PGresult) -> *const c_char;
    fn PQntuples(res: *const PGresult) -> c_int;
    fn PQnfields(res: *const PGresult) -> c_int;
    fn PQgetisnull(res: *const PGresult, row: c_int, column: c_int) -> c_int;
    fn PQgetvalue(res: *const PGresult, row: c_int, column: c_int) -> *const c_char;
    fn PQclear(res: *mut PGresult);
    fn PQgetCancel(conn: *mut PGconn) -> *mut PGcancel;
    fn PQcancel(cancel: *mut PGcancel, errbuf: *mut c_char, errbufsize: c_int) -> c_int;
    fn PQfreeCancel(cancel: *mut PGcancel);
    fn PQfinish(conn: *mut PGconn);
    fn PQconnectionUsedPassword(conn: *const PGconn) -> c_int;
    fn PQconninfoParse(conninfo: *const c_char, errmsg: *mut *mut c_char) -> *mut PQconninfoOption;
    fn PQconndefaults() -> *mut PQconninfoOption;
    fn PQconninfoFree(options: *mut PQconninfoOption);
    fn PQfreemem(pointer: *mut c_void);
}

/// libpq's description of one connection option (`PQconninfoOption`).
#[repr(C)]
struct PQconninfoOption {
    keyword: *mut c_char,
    envvar: *mut c_char,
    compiled: *mut c_char,
    val: *mut c_char,
    label: *mut c_char,
    dispchar: *mut c_char,
    dispsize: c_int,
}

/// A connection's options as keyword and value pairs, in order: what a
/// [`Link`] is started with. Never turned back into one string, so a
/// value (a password, a URI) cannot change how another is read.
pub type Params = Vec<(String, String)>;

/// Read the `key=value` pairs or the URI of a connection string with
/// libpq's own parser; `None` when libpq cannot parse it. libpq's message
/// is not kept: it quotes pieces of the string, which may be a password.
pub fn parse_conninfo(conninfo: &str) -> Option<Params> {
    let text = CString::new(conninfo).ok()?;
    let mut message: *mut c_char = std::ptr::null_mut();
    // SAFETY: a NUL-terminated string; libpq allocates the options array
    // (and the message on failure), both freed here.
    let options = unsafe { PQconninfoParse(text.as_ptr(), &mut message) };
    if !message.is_null() {
        // SAFETY: allocated by libpq for this call.
        unsafe { PQfreemem(message.cast()) };
    }
    if options.is_null() {
        return None;
    }
    let params = options_of(options)
        .into_iter()
        .filter_map(|o| Some((o.keyword, o.value?)))
        .collect();
    // SAFETY: the array PQconninfoParse returned, freed once.
    unsafe { PQconninfoFree(options) };
    Some(params)
}

/// What libpq says about one of its connection options.
#[derive(Debug, Clone)]
pub struct KnownOption {
    pub keyword: String,
    value: Option<String>,
    /// A secret (a password): libpq marks it `*`.
    pub secret: bool,
    /// A debug option (`replication`): libpq marks it `D`.
    pub debug: bool,
}

/// Copy a libpq option array (ending with a NULL keyword).
fn options_of(options: *const PQconninfoOption) -> Vec<KnownOption> {
    let mut known = Vec::new();
    let mut option = options;
    loop {
        // SAFETY: `option` points into the array, which ends with an entry
        // whose keyword is NULL; its strings are NULL or NUL-terminated.
        let entry = unsafe { &*option };
        let Some(keyword) = text_of(entry.keyword) else {
            break;
        };
        let dispchar = text_of(entry.dispchar).unwrap_or_default();
        known.push(KnownOption {
            keyword,
            value: text_of(entry.val),
            secret: dispchar.contains('*'),
            debug: dispchar.contains('D'),
        });
        // SAFETY: not past the terminating entry, which was not reached.
        option = unsafe { option.add(1) };
    }
    known
}

/// Every connection option this libpq knows (`PQconndefaults`).
pub fn known_options() -> Vec<KnownOption> {
    // SAFETY: libpq allocates the array, freed once here.
    let options = unsafe { PQconndefaults() };
    if options.is_null() {
        return Vec::new();
    }
    let known = options_of(options)
        .into_iter()
        .map(|o| KnownOption { value: None, ..o })
        .collect();
    // SAFETY: as above.
    unsafe { PQconninfoFree(options) };
    known
}

/// `text` with every secret in it replaced.
fn redacted(text: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |text, secret| {
            text.replace(secret.as_str(), "********")
        })
}

/// How long a dropped link (or a set of links stopped together) waits for
/// the server to stop its query.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// An error the other server reported, with its fields; `sqlstate` is
/// `None` when the connection itself failed.
#[derive(Debug, Clone, Default)]
pub struct RemoteError {
    pub sqlstate: Option<String>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub context: Option<String>,
}

impl RemoteError {
    fn connection(message: String) -> RemoteError {
        RemoteError {
            message: message.trim_end().to_owned(),
            ..RemoteError::default()
        }
    }
}

/// The rows of a finished query, as text (`None` is NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// Where a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Idle,
    Busy,
    Broken,
}

/// One connection to another server.
pub struct Link {
    conn: *mut PGconn,
    state: State,
    /// The first error result of the running query, kept until it ends.
    failure: Option<RemoteError>,
    rows: Rows,
    /// A cancel was sent for the running query.
    cancel_sent: bool,
    /// The secret values the link was started with, kept out of errors.
    secrets: Vec<String>,
    /// While connecting: what libpq waits for on the socket (`POLLOUT` or
    /// `POLLIN`) before it may be polled again.
    connect_wait: libc::c_short,
}

fn text_of(pointer: *const c_char) -> Option<String> {
    (!pointer.is_null()).then(|| {
        // SAFETY: libpq returns NULL or a NUL-terminated string it owns,
        // read before the result or connection it belongs to is freed.
        unsafe { CStr::from_ptr(pointer) }
            .to_string_lossy()
            .into_owned()
    })
}

impl Link {
    /// Start connecting with the options `params` (see [`parse_conninfo`]),
    /// as `application_name` (unless `params` names one); finish with
    /// [`Link::poll_connect`]. No value is read as a connection string:
    /// `dbname` is a database name.
    pub fn start_params(params: &Params, application_name: &str) -> Result<Link, RemoteError> {
        let to_c = |s: &str| {
            CString::new(s).map_err(|_| RemoteError::connection("contains a NUL byte".into()))
        };
        let secret_keywords: Vec<String> = known_options()
            .into_iter()
            .filter(|o| o.secret)
            .map(|o| o.keyword)
            .collect();
        let secrets: Vec<String> = params
            .iter()
            .filter(|(key, _)| secret_keywords.contains(key))
            .map(|(_, value)| value.clone())
            .collect();
        let mut keys = Vec::with_capacity(params.len() + 1);
        let mut values = Vec::with_capacity(params.len() + 1);
        for (key, value) in params {
            keys.push(to_c(key)?);
            values.push(to_c(value)?);
        }
        keys.push(to_c("fallback_application_name")?);
        values.push(to_c(application_name)?);
        let key_pointers: Vec<*const c_char> = keys
            .iter()
            .map(|k| k.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let value_pointers: Vec<*const c_char> = values
            .iter()
            .map(|v| v.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        // SAFETY: NULL-terminated arrays of NUL-terminated strings that
        // outlive the call; libpq copies what it keeps.
        let conn =
            unsafe { PQconnectStartParams(key_pointers.as_ptr(), value_pointers.as_ptr(), 0) };
        if conn.is_null() {
            return Err(RemoteError::connection("out of memory".into()));
        }
        let mut link = Link {
            conn,
            state: State::Connecting,
            failure: None,
            rows: Vec::new(),
            cancel_sent: false,
            secrets,
            // As libpq's documentation says: as if PQconnectPoll had asked
            // for a writable socket.
            connect_wait: libc::POLLOUT,
        };
        // SAFETY: a connection libpq just made.
        if unsafe { PQstatus(conn) } == CONNECTION_BAD {
            link.state = State::Broken;
            return Err(link.connection_error());
        }
        Ok(link)
    }

    fn connection_error(&self) -> RemoteError {
        // SAFETY: the connection is open (not yet finished).
        let message = text_of(unsafe { PQerrorMessage(self.conn) }).unwrap_or_default();
        RemoteError::connection(redacted(message, &self.secrets))
    }

    /// Did the server ask for the password, and get it? (What dblink
    /// requires of connections made for roles that are not superusers.)
    pub fn used_password(&self) -> bool {
        // SAFETY: the connection is open.
        unsafe { PQconnectionUsedPassword(self.conn) == 1 }
    }

    /// Is the connection still being made?
    pub fn connecting(&self) -> bool {
        self.state == State::Connecting
    }

    /// The connection's socket, to wait on.
    pub fn socket(&self) -> c_int {
        // SAFETY: the connection is open.
        unsafe { PQsocket(self.conn) }
    }

    /// Go on connecting: `Ok(true)` once connected. Never blocks: libpq is
    /// polled only once the socket is ready for what it asked last, so a
    /// caller may call this as often as it likes, and a node whose SYNs
    /// are dropped (or whose accept queue is full) keeps returning
    /// `Ok(false)` until the caller's deadline.
    pub fn poll_connect(&mut self) -> Result<bool, RemoteError> {
        if self.state != State::Connecting {
            return Ok(self.state != State::Broken);
        }
        // Polled before its socket is ready, libpq takes a TCP connect still
        // under way for made and blocks sending its startup packet until
        // the kernel gives up on the SYNs (about two minutes), with no
        // cancel or timeout seen meanwhile.
        if !socket_ready(self.socket(), self.connect_wait) {
            return Ok(false);
        }
        // SAFETY: a connection being made whose socket is ready for what
        // libpq asked, as PQconnectPoll requires.
        match unsafe { PQconnectPoll(self.conn) } {
            PGRES_POLLING_OK => {
                self.state = State::Idle;
                // SAFETY: as above; sends then never block.
                unsafe { PQsetnonblocking(self.conn, 1) };
                Ok(true)
            }
            PGRES_POLLING_FAILED => {
                self.state = State::Broken;
                Err(self.connection_error())
            }
            PGRES_POLLING_READING => {
                self.connect_wait = libc::POLLIN;
                Ok(false)
            }
            _ => {
                self.connect_wait = libc::POLLOUT;
                Ok(false)
            }
        }
    }

    /// Send a query with text parameters; its rows come from
    /// [`Link::poll_result`].
    pub fn send(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), RemoteError> {
        let sql = CString::new(sql).map_err(|_| RemoteError::connection("NUL in query".into()))?;
        let values = params
            .iter()
            .map(|p| p.map(CString::new).transpose())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| RemoteError::connection("a parameter contains a NUL byte".into()))?;
        let pointers: Vec<*const c_char> = values
            .iter()
            .map(|v| v.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
            .collect();
        // SAFETY: an open, idle connection; the strings outlive the call
        // (libpq copies them into its output buffer).
        let sent = unsafe {
            PQsendQueryParams(
                self.conn,
                sql.as_ptr(),
                pointers.len() as c_int,
                std::ptr::null(),
                pointers.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            ) == 1
                && PQflush(self.conn) >= 0
        };
        if !sent {
            self.state = State::Broken;
            return Err(self.connection_error());
        }
        self.state = State::Busy;
        self.cancel_sent = false;
        self.failure = None;
        self.rows.clear();
        Ok(())
    }

    /// Read what arrived: `Ok(None)` while the query runs, then its rows
    /// or the error it ended with.
    pub fn poll_result(&mut self) -> Result<Option<Rows>, RemoteError> {
        if self.state != State::Busy {
            return Err(RemoteError::connection("no query is running".into()));
        }
        // SAFETY: an open connection; flushing what is left of the query
        // and reading what arrived never block in non-blocking mode.
        if unsafe { PQflush(self.conn) } < 0 || unsafe { PQconsumeInput(self.conn) } == 0 {
            self.state = State::Broken;
            return Err(self.connection_error());
        }
        loop {
            // SAFETY: as above.
            if unsafe { PQisBusy(self.conn) } == 1 {
                return Ok(None);
            }
            // SAFETY: not busy, so this does not block.
            let result = unsafe { PQgetResult(self.conn) };
            if result.is_null() {
                self.state = State::Idle;
                return match self.failure.take() {
                    Some(error) => Err(error),
                    None => Ok(Some(std::mem::take(&mut self.rows))),
                };
            }
            self.take(result);
        }
    }

    /// Keep a result's rows or its error, then free it.
    fn take(&mut self, result: *mut PGresult) {
        // SAFETY: a result libpq returned; read, then cleared once.
        unsafe {
            match PQresultStatus(result) {
                PGRES_TUPLES_OK => {
                    let (rows, columns) = (PQntuples(result), PQnfields(result));
                    for row in 0..rows {
                        self.rows.push(
                            (0..columns)
                                .map(|column| {
                                    (PQgetisnull(result, row, column) == 0)
                                        .then(|| text_of(PQgetvalue(result, row, column)))
                                        .flatten()
                                })
                                .collect(),
                        );
                    }
                }
                PGRES_COMMAND_OK => {}
                _ if self.failure.is_none() => {
                    let field = |f| {
                        text_of(PQresultErrorField(result, f)).map(|t| redacted(t, &self.secrets))
                    };
                    self.failure = Some(RemoteError {
                        sqlstate: field(PG_DIAG_SQLSTATE),
                        message: field(PG_DIAG_MESSAGE_PRIMARY).unwrap_or_else(|| {
                            text_of(PQresultErrorMessage(result))
                                .unwrap_or_default()
                                .trim_end()
                                .to_owned()
                        }),
                        detail: field(PG_DIAG_MESSAGE_DETAIL),
                        hint: field(PG_DIAG_MESSAGE_HINT),
                        context: field(PG_DIAG_CONTEXT),
                    });
                }
                _ => {}
            }
            PQclear(result);
        }
    }

    /// Ask the server to cancel the running query; never fails (a cancel
    /// that cannot be sent leaves the query to end by itself).
    pub fn cancel(&mut self) {
        if self.state != State::Busy || self.cancel_sent {
            return;
        }
        self.cancel_sent = true;
        let mut message = [0 as c_char; 256];
        // SAFETY: an open connection; the cancel object is freed here.
        unsafe {
            let cancel = PQgetCancel(self.conn);
            if !cancel.is_null() {
                PQcancel(cancel, message.as_mut_ptr(), message.len() as c_int);
                PQfreeCancel(cancel);
            }
        }
    }

    /// Cancel a running query and wait until the server reports its end,
    /// or `deadline` passed, or the connection broke. A query still running
    /// then is left to end on its own: the connection is given up.
    pub fn stop_by(&mut self, deadline: Instant) {
        if self.state != State::Busy {
            return;
        }
        self.cancel();
        while self.state == State::Busy && Instant::now() < deadline {
            if let Ok(Some(_)) | Err(_) = self.poll_result() {
                break;
            }
            wait_readable(&[self.socket()], Duration::from_millis(50));
        }
        if self.state == State::Busy {
            self.state = State::Broken;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop_by(Instant::now() + DRAIN_LIMIT);
        // SAFETY: finishes the connection this link owns, once.
        unsafe { PQfinish(self.conn) };
    }
}

/// Whether `socket` is ready for `events` (or in error, or closed) now;
/// `true` for no socket, where libpq has something else to do (the next
/// host of a list).
fn socket_ready(socket: c_int, events: libc::c_short) -> bool {
    if socket < 0 {
        return true;
    }
    let mut fd = libc::pollfd {
        fd: socket,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd, alive for the call; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents != 0
}

/// Wait until one of `sockets` can be read, or `timeout` passed (a
/// connecting link that waits to write is polled again after `timeout`:
/// keep it short). Interrupts are the caller's to check.
pub fn wait_readable(sockets: &[c_int], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .filter(|&&fd| fd >= 0)
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return;
    }
    // SAFETY: an array of pollfd of the given length, alive for the call.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis() as c_int,
        )
    };
}
