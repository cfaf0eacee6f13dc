//! The object store's TCP connections, opened so that a stop ends the wait.
//!
//! ureq's own TCP connector connects with a blocking `connect(2)` bounded
//! only by the connect timeout, and registers the socket for
//! [`ureq::Agent::shutdown`] only once it is connected: a store that drops
//! SYNs, or whose accept queue is full, kept a cancel, `statement_timeout`,
//! `pg_terminate_backend` or a fast shutdown waiting for the whole
//! `pg_stream_export.object_connect_timeout`. This connector takes its
//! place: the socket is non-blocking, registered for shutdown before it
//! connects (a shutdown aborts the connect at once), and the wait for it is
//! poll(2) in slices of [`SLICE`] that look at the client's stop flag and
//! the connect deadline. Once connected, the socket is an ordinary blocking
//! one with the per-read and per-write timeouts ureq asks for, as ureq's
//! own transport does. Nothing here calls into PostgreSQL: upload threads
//! use it as the backend does.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout,
    RustlsConnector, ShutdownHandle, Transport,
};

/// The longest a connect waits without looking at the stop flag.
const SLICE: Duration = Duration::from_millis(50);

/// The connector chain of a store client: a CONNECT proxy if the
/// configuration names one (as ureq's default chain), this module's TCP
/// connect, then TLS for `https`. `stop` is the client's stop flag.
pub fn connector(stop: Arc<AtomicBool>) -> impl Connector {
    ().chain(ConnectProxyConnector::default())
        .chain(StoppableTcp { stop })
        .chain(RustlsConnector::default())
}

/// Opens TCP connections that give up when `stop` is set.
pub struct StoppableTcp {
    stop: Arc<AtomicBool>,
}

impl fmt::Debug for StoppableTcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoppableTcp").finish()
    }
}

impl<In: Transport> Connector<In> for StoppableTcp {
    type Out = Either<In, Tcp>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if chained.is_some() {
            // A proxy's tunnel, already open.
            return Ok(chained.map(Either::A));
        }
        let deadline = details
            .timeout
            .not_zero()
            .map(|budget| Instant::now() + *budget);
        let addresses: Vec<SocketAddr> = details.addrs.iter().copied().collect();
        let mut last = None;
        for (index, address) in addresses.iter().enumerate() {
            // Each address gets an equal share of what is left, the last
            // one all of it.
            let share = deadline.map(|deadline| {
                let left = deadline.saturating_duration_since(Instant::now());
                Instant::now() + left / (addresses.len() - index) as u32
            });
            match self.connect_one(details, *address, share) {
                Ok(stream) => {
                    if details.config.no_delay() {
                        stream.set_nodelay(true)?;
                    }
                    let buffers = LazyBuffers::new(
                        details.config.input_buffer_size(),
                        details.config.output_buffer_size(),
                    );
                    return Ok(Some(Either::B(Tcp {
                        stream,
                        buffers,
                        timeout_read: None,
                        timeout_write: None,
                    })));
                }
                Err(e) if self.stop.load(Ordering::SeqCst) => return Err(e),
                Err(e) => last = Some(e),
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                break;
            }
        }
        Err(last.unwrap_or_else(|| {
            ureq::Error::Io(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "no address to connect to",
            ))
        }))
    }
}

impl StoppableTcp {
    /// Connect to `address` by `deadline` (`None`: no limit), unless
    /// stopped first.
    fn connect_one(
        &self,
        details: &ConnectionDetails,
        address: SocketAddr,
        deadline: Option<Instant>,
    ) -> Result<Arc<TcpStream>, ureq::Error> {
        let stream = Arc::new(nonblocking_socket(&address)?);
        // Registered before connecting: Agent::shutdown aborts the connect
        // (shutdown(2) of a connecting socket), and refuses once it ran.
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        if begin_connect(&stream, &address) != 0 {
            let error = io::Error::last_os_error();
            if !matches!(
                error.raw_os_error(),
                Some(libc::EINPROGRESS) | Some(libc::EINTR)
            ) {
                return Err(error.into());
            }
            self.wait_connected(&stream, deadline)?;
        }
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    /// Wait until the connect of `stream` ends, in slices.
    fn wait_connected(
        &self,
        stream: &TcpStream,
        deadline: Option<Instant>,
    ) -> Result<(), ureq::Error> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(ureq::Error::Io(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the connect was stopped",
                )));
            }
            let slice = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ureq::Error::Timeout(ureq::Timeout::Connect));
                    }
                    left.min(SLICE)
                }
                None => SLICE,
            };
            let mut fds = libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one pollfd, alive for the call.
            let ready = unsafe { libc::poll(&mut fds, 1, slice.as_millis().max(1) as libc::c_int) };
            if ready <= 0 || self.stop.load(Ordering::SeqCst) {
                continue; // a timeout, EINTR, or a stop seen at the top
            }
            if let Some(error) = stream.take_error()? {
                return Err(error.into());
            }
            // Woken without an error: connected, unless shut down.
            stream.peer_addr()?;
            return Ok(());
        }
    }
}

/// A TCP socket of `address`'s family, non-blocking, close-on-exec.
fn nonblocking_socket(address: &SocketAddr) -> io::Result<TcpStream> {
    let family = match address {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(TcpStream::from(owned))
}

/// `address` as a `sockaddr_in` or `sockaddr_in6` in a `sockaddr_storage`.
fn raw_address(address: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let raw = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for,
            // every sockaddr type.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(storage).cast::<libc::sockaddr_in>(),
                    raw,
                )
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let raw = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(storage).cast::<libc::sockaddr_in6>(),
                    raw,
                )
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

/// A connected socket, as ureq's own TCP transport: blocking I/O with the
/// per-read and per-write timeouts of each call, shared (weakly) with the
/// agent's shutdown.
pub struct Tcp {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    timeout_read: Option<Duration>,
    timeout_write: Option<Duration>,
}

impl fmt::Debug for Tcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tcp")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// The time left of `timeout`, or the error it ran out with.
fn left_of(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|left| *left))
}

/// A socket error, with a timeout reported as ureq's `reason`.
fn io_error(error: io::Error, reason: ureq::Timeout) -> ureq::Error {
    match error.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ureq::Error::Timeout(reason),
        _ => ureq::Error::Io(error),
    }
}

impl Transport for Tcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let left = left_of(timeout)?;
        if left != self.timeout_write {
            self.stream.set_write_timeout(left)?;
            self.timeout_write = left;
        }
        let output = &self.buffers.output()[..amount];
        (&*self.stream)
            .write_all(output)
            .map_err(|e| io_error(e, timeout.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let left = left_of(timeout)?;
        if left != self.timeout_read {
            self.stream.set_read_timeout(left)?;
            self.timeout_read = left;
        }
        let started = Instant::now();
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match (&*self.stream).read(input) {
                // A signal (PostgreSQL's, on the backend's thread) is no
                // end: read again for what is left of the timeout.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    let Some(left) = left else { continue };
                    let rest = left.saturating_sub(started.elapsed());
                    if rest.is_zero() {
                        return Err(ureq::Error::Timeout(timeout.reason));
                    }
                    self.stream.set_read_timeout(Some(rest))?;
                    self.timeout_read = Some(rest);
                }
                Err(e) => return Err(io_error(e, timeout.reason)),
                Ok(amount) => break amount,
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // Open when a read would block: no end of stream, no error, and no
        // bytes the store sent unasked.
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8];
        let open = matches!(
            (&*self.stream).read(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        );
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

/// Start connect(2) of the non-blocking `stream` to `address`: 0 when it
/// connected at once, else -1 with the reason in errno (`EINPROGRESS`
/// while it goes on).
fn begin_connect(stream: &TcpStream, address: &SocketAddr) -> libc::c_int {
    let (storage, length) = raw_address(address);
    // SAFETY: connect(2) of the caller's socket to an address held in
    // `storage`, of `length` bytes, alive for the call.
    unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(storage).cast::<libc::sockaddr>(),
            length,
        )
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::net::TcpListener;

    /// A listener whose accept queue is full: a connect to it hangs, as to
    /// a host that drops SYNs.
    fn full_listener() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        // SAFETY: listen(2) on the listener's own socket, backlog 0.
        unsafe { libc::listen(listener.as_raw_fd(), 0) };
        let filler = vec![TcpStream::connect(address).unwrap()];
        (listener, filler, address)
    }

    fn stoppable(stop: &Arc<AtomicBool>) -> StoppableTcp {
        StoppableTcp { stop: stop.clone() }
    }

    #[test]
    fn a_connect_that_hangs_ends_at_its_deadline() {
        let (_listener, _filler, address) = full_listener();
        let stop = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(nonblocking_socket(&address).unwrap());
        begin_connect(&stream, &address);
        let started = Instant::now();
        let result = stoppable(&stop)
            .wait_connected(&stream, Some(Instant::now() + Duration::from_millis(300)));
        assert!(matches!(
            result,
            Err(ureq::Error::Timeout(ureq::Timeout::Connect))
        ));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn a_stop_ends_a_connect_that_hangs() {
        let (_listener, _filler, address) = full_listener();
        let stop = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(nonblocking_socket(&address).unwrap());
        begin_connect(&stream, &address);
        let setter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::SeqCst);
            })
        };
        let started = Instant::now();
        let result = stoppable(&stop).wait_connected(&stream, None);
        setter.join().unwrap();
        assert!(result.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_listener_that_accepts_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(nonblocking_socket(&address).unwrap());
        begin_connect(&stream, &address);
        stoppable(&stop)
            .wait_connected(&stream, Some(Instant::now() + Duration::from_secs(5)))
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), address);
    }
}
