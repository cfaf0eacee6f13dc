//! Fast gzip: the input is cut into independent blocks, each compressed by
//! libdeflate into a gzip member on helper threads, and the members are
//! written in order. Several gzip members one after another are a valid
//! gzip file (RFC 1952), read as one stream by gzip, zcat, Python, ...
//!
//! Helper threads only run libdeflate on Rust-owned buffers; they never
//! call into PostgreSQL. Every helper is joined before the writer is gone,
//! and a helper's failure comes back as an `io::Error` on the caller's
//! thread.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

/// (sequence number, input block, a spare buffer for the output)
type Job = (u64, Vec<u8>, Vec<u8>);
/// (sequence number, the member or an error, the emptied input block)
type Done = (u64, Result<Vec<u8>, String>, Vec<u8>);

/// Helper threads for compression: one per core, at most four.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

pub struct ParallelGzip {
    level: u32,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_submit: u64,
    next_write: u64,
    finished: BTreeMap<u64, Vec<u8>>,
    max_in_flight: u64,
    /// Buffers that went round once, reused so that memory stays a fixed
    /// pool instead of a churn of 1 MiB allocations across threads.
    spare_inputs: Vec<Vec<u8>>,
    spare_outputs: Vec<Vec<u8>>,
}

/// Compress `input` into `out`, a reused buffer (resized to the bound,
/// then cut to the member's length).
fn compress_member(
    compressor: &mut libdeflater::Compressor,
    input: &[u8],
    mut out: Vec<u8>,
) -> Result<Vec<u8>, String> {
    out.clear();
    out.resize(compressor.gzip_compress_bound(input.len()), 0);
    let n = compressor
        .gzip_compress(input, &mut out)
        .map_err(|e| format!("gzip compression failed: {e:?}"))?;
    out.truncate(n);
    Ok(out)
}

impl ParallelGzip {
    pub fn new(level: u32, workers: usize) -> ParallelGzip {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let compression_level = libdeflater::CompressionLvl::new(level as i32).unwrap_or_default();
        let handles = (0..workers)
            .map(|_| {
                let job_rx = std::sync::Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                std::thread::spawn(move || {
                    let mut compressor = libdeflater::Compressor::new(compression_level);
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((seq, input, output)) = job else {
                            return;
                        };
                        let result = compress_member(&mut compressor, &input, output);
                        if done_tx.send((seq, result, input)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ParallelGzip {
            level,
            jobs: Some(job_tx),
            done: done_rx,
            workers: handles,
            next_submit: 0,
            next_write: 0,
            finished: BTreeMap::new(),
            max_in_flight: (workers as u64 * 2).max(2),
            spare_inputs: Vec::new(),
            spare_outputs: Vec::new(),
        }
    }

    fn broken() -> io::Error {
        io::Error::other("a compression thread stopped unexpectedly")
    }

    fn collect(&mut self, result: Done) -> io::Result<()> {
        let (seq, member, mut input) = result;
        input.clear();
        self.spare_inputs.push(input);
        let member = member.map_err(io::Error::other)?;
        self.finished.insert(seq, member);
        Ok(())
    }

    /// An empty input buffer that went round before, if one is free.
    pub fn spare_input(&mut self) -> Option<Vec<u8>> {
        self.spare_inputs.pop()
    }

    /// Queue one block; waits when too many are in flight, so memory stays
    /// bounded by a few blocks.
    pub fn submit(&mut self, block: Vec<u8>) -> io::Result<()> {
        while self.next_submit - self.next_write - self.finished.len() as u64 >= self.max_in_flight
        {
            let result = self.done.recv().map_err(|_| Self::broken())?;
            self.collect(result)?;
        }
        let jobs = self.jobs.as_ref().ok_or_else(Self::broken)?;
        let output = self.spare_outputs.pop().unwrap_or_default();
        jobs.send((self.next_submit, block, output))
            .map_err(|_| Self::broken())?;
        self.next_submit += 1;
        Ok(())
    }

    /// Write every member that is finished and next in order.
    pub fn drain_ready(&mut self, out: &mut impl Write) -> io::Result<u64> {
        while let Ok(result) = self.done.try_recv() {
            self.collect(result)?;
        }
        self.write_in_order(out)
    }

    fn write_in_order(&mut self, out: &mut impl Write) -> io::Result<u64> {
        let mut written = 0;
        while let Some(member) = self.finished.remove(&self.next_write) {
            out.write_all(&member)?;
            written += member.len() as u64;
            self.next_write += 1;
            self.spare_outputs.push(member);
        }
        Ok(written)
    }

    /// Wait for every block, write the rest and stop the helpers. An
    /// export with no input still gets one (empty) member.
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<u64> {
        if self.next_submit == 0 {
            let mut compressor = libdeflater::Compressor::new(
                libdeflater::CompressionLvl::new(self.level as i32).unwrap_or_default(),
            );
            let member =
                compress_member(&mut compressor, &[], Vec::new()).map_err(io::Error::other)?;
            self.finished.insert(0, member);
            self.next_submit = 1;
        }
        let mut written = 0;
        while self.next_write < self.next_submit {
            written += self.write_in_order(out)?;
            if self.next_write == self.next_submit {
                break;
            }
            let result = self.done.recv().map_err(|_| Self::broken())?;
            self.collect(result)?;
        }
        self.stop();
        Ok(written)
    }

    fn stop(&mut self) {
        self.jobs = None; // closing the queue ends every helper's loop
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for ParallelGzip {
    fn drop(&mut self) {
        self.stop();
    }
}
