//! An ordered parallel map with bounded memory.
//!
//! A producer thread yields items in order; `workers` threads transform them; the calling thread
//! receives results strictly in input order. Channels are bounded, and results that arrive early
//! wait in a small reorder buffer, so at most about `3 * workers` items exist at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

/// Runs `produce` on its own thread, `work` on `workers` threads and `consume` on this one.
///
/// `produce` pushes items through the sender it is given and returns a value of its own (for
/// example a running digest) or an error; `consume` gets `(index, result)` in order. The first
/// error from any side stops the pipeline and is returned.
pub(crate) fn ordered<I, O, P, E>(
    workers: usize,
    produce: impl FnOnce(&dyn Fn(I) -> bool) -> Result<P, E> + Send,
    work: impl Fn(&mut WorkerState, I) -> Result<O, E> + Sync,
    mut consume: impl FnMut(u64, O) -> Result<(), E>,
) -> Result<P, E>
where
    I: Send,
    O: Send,
    P: Send,
    E: Send,
{
    let workers = workers.max(1);
    let (in_tx, in_rx) = mpsc::sync_channel::<(u64, I)>(workers * 2);
    let (out_tx, out_rx) = mpsc::sync_channel::<(u64, Result<O, E>)>(workers * 2);
    // Workers share the input receiver; when the last of them stops, it is dropped and a
    // producer blocked on a full channel is released with an error.
    let in_rx = Arc::new(Mutex::new(in_rx));
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let next = std::cell::Cell::new(0u64);
            let push = |item: I| {
                let i = next.get();
                next.set(i + 1);
                in_tx.send((i, item)).is_ok()
            };
            produce(&push)
        });
        for _ in 0..workers {
            let out_tx = out_tx.clone();
            let in_rx = Arc::clone(&in_rx);
            let work = &work;
            s.spawn(move || {
                let mut state = WorkerState::default();
                loop {
                    let next = in_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((i, item))) = next else { break };
                    if out_tx.send((i, work(&mut state, item))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(out_tx);
        drop(in_rx);
        let mut pending: BTreeMap<u64, O> = BTreeMap::new();
        let mut want = 0u64;
        let mut failure = None;
        for (i, r) in out_rx.iter() {
            match r {
                Ok(o) => {
                    pending.insert(i, o);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            while let Some(o) = pending.remove(&want) {
                if let Err(e) = consume(want, o) {
                    failure = Some(e);
                    break;
                }
                want += 1;
            }
            if failure.is_some() {
                break;
            }
        }
        // Dropping the receiver makes the workers' sends fail, so they stop; the producer then
        // finds its channel closed.
        drop(out_rx);
        let produced = producer.join().expect("producer thread panicked");
        match failure {
            Some(e) => Err(e),
            None => produced,
        }
    })
}

/// Per-worker reusable state (compression contexts are expensive to create).
#[derive(Default)]
pub(crate) struct WorkerState {
    pub(crate) compressor: Option<zstd::bulk::Compressor<'static>>,
    pub(crate) decoder: Option<crate::ChunkDecoder>,
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState").finish_non_exhaustive()
    }
}
