//! The commit queue: a bounded multi-producer, single-consumer queue whose consumer takes
//! everything waiting in one go — that is what turns many small commits into one group commit.
//!
//! Protocol:
//! - producers never block: [`BatchQueue::push`] either enqueues or hands the item back with
//!   `Full` (admission control: the caller backs off) or `Closed`;
//! - the consumer blocks in [`BatchQueue::pop_batch`] until at least one item is waiting or the
//!   queue is closed, then takes items in arrival order up to a batch's [`Limits`] (items and
//!   bytes; always at least one);
//! - after [`BatchQueue::close`], pushes fail, and the consumer drains what was queued before it
//!   sees the end.
//!
//! Invariants (model-checked by the `loom_*` tests): no item is lost or delivered twice; order
//! per producer is kept; the queue never holds more items than its capacity (nor more bytes,
//! unless one item alone outweighs it: unit tests); a consumer waiting on an empty queue is
//! always woken by a push or a close.

use std::collections::VecDeque;

use crate::sync::{Condvar, Mutex};

/// Why a push was refused; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The queue was closed.
    Closed(T),
}

/// How much a queue, or a batch taken from it, may hold: items and their bytes. An item heavier
/// than `bytes_max` alone is still let through when nothing else is held, so that nothing is
/// refused forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) len_max: usize,
    pub(crate) bytes_max: usize,
}

struct State<T> {
    /// Items with their weights in bytes.
    items: VecDeque<(T, usize)>,
    bytes: usize,
    closed: bool,
}

/// See the module documentation.
pub(crate) struct BatchQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: Limits,
}

impl<T> BatchQueue<T> {
    pub(crate) fn new(capacity: Limits) -> Self {
        assert!(capacity.len_max > 0, "a queue must hold at least one item");
        Self {
            state: Mutex::new(State { items: VecDeque::new(), bytes: 0, closed: false }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Enqueues `item`, weighing `bytes`, unless the queue is full or closed.
    pub(crate) fn push(&self, item: T, bytes: usize) -> Result<(), PushError<T>> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(PushError::Closed(item));
        }
        let heavy = !state.items.is_empty() && state.bytes + bytes > self.capacity.bytes_max;
        if state.items.len() >= self.capacity.len_max || heavy {
            return Err(PushError::Full(item));
        }
        state.bytes += bytes;
        state.items.push_back((item, bytes));
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Blocks until items are waiting, then moves into `batch`, in order, as many as `limits`
    /// allow (always at least one). Returns `false` once the queue is closed and empty.
    pub(crate) fn pop_batch(&self, limits: Limits, batch: &mut Vec<T>) -> bool {
        let mut state = lock(&self.state);
        loop {
            if !state.items.is_empty() {
                let (mut taken, mut bytes) = (0, 0);
                while let Some((_, weight)) = state.items.front() {
                    if taken == limits.len_max || (taken > 0 && bytes + weight > limits.bytes_max) {
                        break;
                    }
                    bytes += weight;
                    taken += 1;
                    if let Some((item, _)) = state.items.pop_front() {
                        batch.push(item);
                    }
                }
                state.bytes -= bytes;
                return true;
            }
            if state.closed {
                return false;
            }
            state = match self.ready.wait(state) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// Refuses further pushes and wakes the consumer.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    /// How many items are waiting.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).items.len()
    }
}

/// Locks, ignoring poison: the state is a plain queue, valid after any panic between operations.
fn lock<T>(mutex: &Mutex<T>) -> crate::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn items(len_max: usize) -> Limits {
        Limits { len_max, bytes_max: usize::MAX }
    }

    #[test]
    fn bounded_fifo_batches() {
        let q = BatchQueue::new(items(3));
        for i in 0..3 {
            q.push(i, 1).unwrap();
        }
        assert_eq!(q.push(9, 1), Err(PushError::Full(9)));
        let mut batch = Vec::new();
        assert!(q.pop_batch(items(2), &mut batch));
        assert_eq!(batch, [0, 1]);
        assert!(q.pop_batch(items(10), &mut batch));
        assert_eq!(batch, [0, 1, 2]);
        q.close();
        assert_eq!(q.push(4, 1), Err(PushError::Closed(4)));
        assert!(!q.pop_batch(items(10), &mut batch));
    }

    #[test]
    fn bytes_bound_the_queue_and_each_batch_but_never_starve_a_heavy_item() {
        let q = BatchQueue::new(Limits { len_max: 100, bytes_max: 10 });
        q.push('a', 6).unwrap();
        assert_eq!(q.push('b', 6), Err(PushError::Full('b')), "12 bytes would be held");
        q.push('b', 4).unwrap();
        let mut batch = Vec::new();
        assert!(q.pop_batch(Limits { len_max: 10, bytes_max: 5 }, &mut batch));
        assert_eq!(batch, ['a'], "one item always goes, even past the batch's bytes");
        assert!(q.pop_batch(Limits { len_max: 10, bytes_max: 5 }, &mut batch));
        assert_eq!(batch, ['a', 'b']);
        q.push('c', 50).unwrap(); // heavier than the whole queue, but alone: let through
        assert_eq!(q.push('d', 1), Err(PushError::Full('d')));
        batch.clear();
        assert!(q.pop_batch(items(10), &mut batch));
        assert_eq!(batch, ['c']);
        q.push('d', 1).unwrap();
    }

    #[test]
    fn close_drains_before_ending() {
        let q = BatchQueue::new(items(8));
        q.push(1, 1).unwrap();
        q.close();
        let mut batch = Vec::new();
        assert!(q.pop_batch(items(8), &mut batch));
        assert!(!q.pop_batch(items(8), &mut batch));
        assert_eq!(batch, [1]);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    fn items(len_max: usize) -> Limits {
        Limits { len_max, bytes_max: usize::MAX }
    }
    use loom::sync::Arc;
    use loom::thread;

    /// Two producers and a consumer: every pushed item arrives once, in per-producer order,
    /// and the consumer always wakes to see the close. Preemptions are bounded (as tokio does)
    /// to keep the search to seconds; bugs of this size show within three.
    #[test]
    fn loom_no_item_lost_or_doubled() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let q = Arc::new(BatchQueue::new(items(2)));
            let producers: Vec<_> = (0..2u32)
                .map(|p| {
                    let q = q.clone();
                    thread::spawn(move || {
                        let mut pushed = Vec::new();
                        for i in 0..2 {
                            if q.push(p * 10 + i, 1).is_ok() {
                                pushed.push(p * 10 + i);
                            }
                        }
                        pushed
                    })
                })
                .collect();
            let consumer = {
                let q = q.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    while q.pop_batch(items(1), &mut got) {
                        assert!(q.len() <= 2, "queue over capacity");
                    }
                    got
                })
            };
            let mut pushed: Vec<u32> =
                producers.into_iter().flat_map(|h| h.join().unwrap()).collect();
            q.close();
            let got = consumer.join().unwrap();
            for p in 0..2 {
                let mine: Vec<_> = got.iter().filter(|v| *v / 10 == p).collect();
                assert!(mine.windows(2).all(|w| w[0] < w[1]), "order per producer broken: {got:?}");
            }
            let mut sorted = got.clone();
            sorted.sort_unstable();
            pushed.sort_unstable();
            assert_eq!(sorted, pushed, "lost or doubled items");
        });
    }

    /// A consumer blocked on an empty queue is woken by a single push.
    #[test]
    fn loom_push_wakes_a_waiting_consumer() {
        loom::model(|| {
            let q = Arc::new(BatchQueue::new(items(1)));
            let consumer = {
                let q = q.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    assert!(q.pop_batch(items(4), &mut got));
                    got
                })
            };
            q.push(7, 1).unwrap();
            assert_eq!(consumer.join().unwrap(), [7]);
        });
    }
}
