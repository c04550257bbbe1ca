//! The commit queue: a bounded multi-producer, single-consumer queue whose consumer takes
//! everything waiting in one go — that is what turns many small commits into one group commit.
//!
//! Protocol:
//! - producers never block: [`BatchQueue::push`] either enqueues or hands the item back with
//!   `Full` (admission control: the caller backs off) or `Closed`;
//! - the consumer blocks in [`BatchQueue::pop_batch`] until at least one item is waiting or the
//!   queue is closed, then takes up to `batch_len_max` items in arrival order;
//! - after [`BatchQueue::close`], pushes fail, and the consumer drains what was queued before it
//!   sees the end.
//!
//! Invariants (model-checked by the `loom_*` tests): no item is lost or delivered twice; order
//! per producer is kept; the queue never holds more than its capacity; a consumer waiting on an
//! empty queue is always woken by a push or a close.

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

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// See the module documentation.
pub(crate) struct BatchQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> BatchQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a queue must hold at least one item");
        Self {
            state: Mutex::new(State { items: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Enqueues `item` unless the queue is full or closed.
    pub(crate) fn push(&self, item: T) -> Result<(), PushError<T>> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(PushError::Closed(item));
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Blocks until items are waiting, then moves up to `batch_len_max` of them into `batch`.
    /// Returns `false` once the queue is closed and empty.
    pub(crate) fn pop_batch(&self, batch_len_max: usize, batch: &mut Vec<T>) -> bool {
        let mut state = lock(&self.state);
        loop {
            if !state.items.is_empty() {
                let take = state.items.len().min(batch_len_max);
                batch.extend(state.items.drain(..take));
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

    #[test]
    fn bounded_fifo_batches() {
        let q = BatchQueue::new(3);
        for i in 0..3 {
            q.push(i).unwrap();
        }
        assert_eq!(q.push(9), Err(PushError::Full(9)));
        let mut batch = Vec::new();
        assert!(q.pop_batch(2, &mut batch));
        assert_eq!(batch, [0, 1]);
        assert!(q.pop_batch(10, &mut batch));
        assert_eq!(batch, [0, 1, 2]);
        q.close();
        assert_eq!(q.push(4), Err(PushError::Closed(4)));
        assert!(!q.pop_batch(10, &mut batch));
    }

    #[test]
    fn close_drains_before_ending() {
        let q = BatchQueue::new(8);
        q.push(1).unwrap();
        q.close();
        let mut batch = Vec::new();
        assert!(q.pop_batch(8, &mut batch));
        assert!(!q.pop_batch(8, &mut batch));
        assert_eq!(batch, [1]);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
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
            let q = Arc::new(BatchQueue::new(2));
            let producers: Vec<_> = (0..2u32)
                .map(|p| {
                    let q = q.clone();
                    thread::spawn(move || {
                        let mut pushed = Vec::new();
                        for i in 0..2 {
                            if q.push(p * 10 + i).is_ok() {
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
                    while q.pop_batch(1, &mut got) {
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
            let q = Arc::new(BatchQueue::new(1));
            let consumer = {
                let q = q.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    assert!(q.pop_batch(4, &mut got));
                    got
                })
            };
            q.push(7).unwrap();
            assert_eq!(consumer.join().unwrap(), [7]);
        });
    }
}
