//! A writer that hands blocks to a helper thread, so the backend keeps
//! encoding rows while the kernel copies the previous block into the file.
//! The helper only calls write(2) on a file it owns; it never calls into
//! PostgreSQL. It is joined on `finish` and on drop, and its error comes
//! back to the caller's thread.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Blocks queued at most; with 1 MiB blocks this bounds the memory.
const QUEUE: usize = 4;

/// `W` is what the helper writes into: a [`File`], or a program's pipe
/// (`destination::program`), whose writer gives up when told to.
pub struct BackgroundWriter<W: Write + Send + 'static = File> {
    blocks: Option<SyncSender<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
    worker: Option<JoinHandle<io::Result<W>>>,
    /// Called between tries while the helper is behind, for an output that
    /// may stop reading (a program's pipe): it waits a little and acts on
    /// a cancel. `None`: block until the helper takes the data.
    wait: Option<fn()>,
}

impl<W: Write + Send + 'static> BackgroundWriter<W> {
    pub fn new(mut file: W) -> BackgroundWriter<W> {
        let (block_tx, block_rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
        let worker = std::thread::spawn(move || {
            for mut block in block_rx {
                file.write_all(&block)?;
                block.clear();
                let _ = spare_tx.send(block);
            }
            Ok(file)
        });
        BackgroundWriter {
            blocks: Some(block_tx),
            spare: spare_rx,
            worker: Some(worker),
            wait: None,
        }
    }

    /// As `new`, calling `wait` while the helper is behind (in `write` and
    /// `finish`, never in drop) instead of blocking.
    pub fn waiting_with(file: W, wait: fn()) -> BackgroundWriter<W> {
        let mut writer = BackgroundWriter::new(file);
        writer.wait = Some(wait);
        writer
    }

    /// Stop the helper and return its result.
    fn join(&mut self) -> io::Result<W> {
        self.blocks = None;
        match self.worker.take() {
            Some(worker) => worker
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the file writer thread panicked"))),
            None => Err(io::Error::other("the file writer has already finished")),
        }
    }

    /// Wait until every block is written; return the file.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(wait) = self.wait {
            self.blocks = None; // the helper ends after the last block
            while self.worker.as_ref().is_some_and(|w| !w.is_finished()) {
                wait();
            }
        }
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for BackgroundWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut block = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(data.len()));
        block.extend_from_slice(data);
        let sent = match (&self.blocks, self.wait) {
            (Some(blocks), None) => blocks.send(block).is_ok(),
            (Some(blocks), Some(wait)) => loop {
                match blocks.try_send(block) {
                    Ok(()) => break true,
                    Err(TrySendError::Full(back)) => {
                        block = back;
                        wait();
                    }
                    Err(TrySendError::Disconnected(_)) => break false,
                }
            },
            (None, _) => false,
        };
        if !sent {
            // The helper stopped: its error explains why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the file writer stopped")));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for BackgroundWriter<W> {
    fn drop(&mut self) {
        if self.worker.is_some() {
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn writes_everything_in_order() {
        let dir = std::env::temp_dir().join(format!("pse-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let mut writer = BackgroundWriter::new(File::create(&path).unwrap());
        let mut expected = Vec::new();
        for i in 0..500u32 {
            let block = vec![(i % 251) as u8; 1000 + i as usize];
            writer.write_all(&block).unwrap();
            expected.extend_from_slice(&block);
        }
        drop(writer.finish().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_write_error_comes_back() {
        // /dev/full fails every write with ENOSPC.
        let Ok(file) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let mut writer = BackgroundWriter::new(file);
        let mut result = Ok(());
        for _ in 0..10 {
            result = writer.write_all(&[0u8; 4096]);
            if result.is_err() {
                break;
            }
        }
        let err = result
            .err()
            .or_else(|| writer.finish().err())
            .expect("an error");
        assert_eq!(err.raw_os_error(), Some(28));
    }
}
