//! The gateway-wide memory budget for large messages (`server.buffer_budget_bytes`): a
//! message too large for a session's own buffers is read only once its size is charged to
//! the budget, and the charge is given back when the message has left pgward. A session that
//! finds the budget spent stops reading that side (backpressure) until others give bytes back.

use std::future::Future;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Messages up to this many bytes (length field) are read into a session's own buffers
/// without a charge: the size of the out-buffer mark past which a session stops reading the
/// other side, so a session holds a few of these at most.
pub const UNCHARGED_MESSAGE_BYTES: usize = 256 * 1024;

/// Bytes pgward may hold, over all sessions, in messages larger than
/// [`UNCHARGED_MESSAGE_BYTES`]. Cheap to clone (one semaphore, shared).
#[derive(Clone, Debug)]
pub struct Budget {
    sem: std::sync::Arc<Semaphore>,
    total: usize,
}

/// Bytes charged to the [`Budget`]; given back when dropped.
pub type Charge = OwnedSemaphorePermit;

impl Budget {
    /// A budget of `total` bytes (at most what a semaphore counts).
    pub fn new(total: usize) -> Budget {
        let total = total.min(Semaphore::MAX_PERMITS);
        Budget { sem: std::sync::Arc::new(Semaphore::new(total)), total }
    }

    /// The configured size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not charged right now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// `n` bytes if they are free now.
    pub fn try_charge(&self, n: usize) -> Option<Charge> {
        let n = u32::try_from(n).ok()?;
        self.sem.clone().try_acquire_many_owned(n).ok()
    }

    /// `n` bytes, once they are free. Waiters are served in order, so a large request is not
    /// overtaken forever by smaller ones. Resolves to None only for a request that can never
    /// be met (more than the whole budget).
    pub fn charge(&self, n: usize) -> impl Future<Output = Option<Charge>> + Send + 'static {
        let sem = self.sem.clone();
        let n = u32::try_from(n).ok().filter(|&n| n as usize <= self.total);
        async move {
            match n {
                Some(n) => sem.acquire_many_owned(n).await.ok(),
                None => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_come_back_when_dropped() {
        let b = Budget::new(100);
        let c = b.try_charge(60).expect("free");
        assert!(b.try_charge(60).is_none(), "only 40 left");
        assert_eq!(b.available(), 40);
        drop(c);
        assert_eq!(b.available(), 100);
    }

    #[test]
    fn a_waiter_gets_its_bytes_once_they_come_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let b = Budget::new(100);
            let held = b.try_charge(80).unwrap();
            let waiting = tokio::spawn(b.charge(50));
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
            drop(held);
            let got = waiting.await.unwrap().expect("charged");
            assert_eq!(got.num_permits(), 50);
        });
    }

    #[test]
    fn more_than_the_whole_budget_is_never_granted() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let b = Budget::new(100);
        assert!(rt.block_on(b.charge(101)).is_none());
        assert!(b.try_charge(101).is_none());
    }
}
