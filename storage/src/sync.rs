//! The concurrency shim, as in tokio's `src/loom`: std types normally, loom's under `cfg(loom)`
//! so that `loom_*` tests model-check every interleaving of the code written on top.

#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
