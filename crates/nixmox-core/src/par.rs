//! Data parallelism for the core's per-file work: the same results, in the same order, as a
//! sequential loop, on as many threads as the machine offers.
//!
//! Threads are computation, not I/O: nothing here touches the file system, and a thread that
//! cannot be started only means its share runs on the calling thread, so the core still cannot
//! fail except on invalid input.

use std::sync::{Mutex, PoisonError};

/// At most this many threads, however many cores there are.
const MAX_THREADS: usize = 8;
/// Fewer items than this per thread are not worth a thread.
const MIN_PER_THREAD: usize = 64;

/// How many threads to use for `items` items.
pub fn threads(items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(MAX_THREADS).min(items / MIN_PER_THREAD).max(1)
}

/// `items.iter().map(f).collect()`, on up to [`threads`] threads; the results keep the order
/// of `items` and may borrow from them.
pub fn map<'a, T: Sync, R: Send>(items: &'a [T], f: impl Fn(&'a T) -> R + Sync) -> Vec<R> {
    let n = threads(items.len());
    if n <= 1 {
        return items.iter().map(f).collect();
    }
    in_shares(
        items.chunks(share_len(items.len(), n)),
        n,
        items.len(),
        |share| share.iter().map(&f).collect(),
    )
}

/// `items.iter_mut().map(f).collect()`, on up to [`threads`] threads; the results keep the
/// order of `items`.
pub fn map_mut<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut T) -> R + Sync) -> Vec<R> {
    let n = threads(items.len());
    if n <= 1 {
        return items.iter_mut().map(f).collect();
    }
    let len = items.len();
    in_shares(items.chunks_mut(share_len(len, n)), n, len, |share| {
        share.iter_mut().map(&f).collect()
    })
}

/// `(a(), b())`, with `a` on another thread when the machine has more than one core.
pub fn join<A: Send, B>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    if threads(usize::MAX) <= 1 {
        return (a(), b());
    }
    // `a` waits in a slot, so that it still runs here if its thread cannot be started.
    let slot = Mutex::new(Some(a));
    let take = || slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new().spawn_scoped(scope, || take().map(|a| a()));
        let rb = b();
        let ra = match spawned {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(_) => None,
        };
        match ra.or_else(|| take().map(|a| a())) {
            Some(ra) => (ra, rb),
            None => unreachable!("`a` ran on one thread or the other"),
        }
    })
}

/// A few shares per thread, so a thread slowed by the rest of the machine holds up little.
fn share_len(len: usize, threads: usize) -> usize {
    len.div_ceil(threads * 4)
}

/// Runs `f` on each share, on `n` threads (the calling one included) taking shares from a
/// queue; the results in the order of the shares.
fn in_shares<S: Send, R: Send>(
    shares: impl Iterator<Item = S> + Send,
    n: usize,
    len: usize,
    f: impl Fn(S) -> Vec<R> + Sync,
) -> Vec<R> {
    let queue = Mutex::new(shares.enumerate());
    let done: Mutex<Vec<(usize, Vec<R>)>> = Mutex::new(Vec::new());
    let worker = || loop {
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
        let Some((k, share)) = next else { break };
        let out = f(share);
        done.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((k, out));
    };
    std::thread::scope(|scope| {
        for _ in 1..n {
            // A thread that cannot be started leaves its shares to the others.
            let _ = std::thread::Builder::new().spawn_scoped(scope, worker);
        }
        worker();
    });
    let mut done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
    done.sort_unstable_by_key(|(k, _)| *k);
    let mut out = Vec::with_capacity(len);
    for (_, part) in done {
        out.extend(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_order_of_the_items() {
        let mut items: Vec<usize> = (0..10_000).collect();
        let want: Vec<usize> = items.iter().map(|i| i * 3).collect();
        assert_eq!(map(&items, |i| i * 3), want);
        assert_eq!(
            map_mut(&mut items, |i| {
                *i *= 3;
                *i
            }),
            want
        );
        assert_eq!(items, want);
        assert!(map(&[] as &[u8], |b| *b).is_empty());
        assert_eq!(join(|| 1, || "b"), (1, "b"));
    }
}
