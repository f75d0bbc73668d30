//! Completion and event queue objects over a provider's progress engine, and the
//! background progress thread: every provider's `CqOps`/`EqOps` in one place.
//!
//! A provider implements [`Progress`] (cheap progress on a completion-queue read, full
//! progress on an event-queue read or a blocking wait, a sleep until its descriptors
//! or the queue's are readable, and how to start background progress), pushes its
//! completions and events into [`WaitQueue`]s, and opens its queues as
//! [`ProviderCq`] / [`ProviderEq`]. [`start_progress_thread`] is the background thread
//! of [`Progress::Auto`](crate::Progress::Auto) domains.

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::cq::Completion;
use crate::eq::Event;
use crate::error::{Error, Result};
use crate::provider::{CqOps, EqOps};
use crate::wait::WaitQueue;

/// What a provider's queues need from its progress engine.
pub trait Progress: Send + Sync + 'static {
    /// Cheap progress for a completion-queue read in manual mode (e.g. skipped when
    /// another thread is already progressing).
    fn poll(&self);
    /// Full progress: event-queue reads and blocking waits (connection management
    /// too).
    fn poll_full(&self);
    /// Sleeps until the provider has activity or `queue_fd` is readable, at most until
    /// `deadline` (`None`: until activity).
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>);
    /// Starts background progress (once), because an async waker was registered.
    fn start_auto(self: &Arc<Self>);
}

/// How long the progress thread sleeps at most between two looks at whether its engine
/// is still alive (it holds the engine while it sleeps).
pub const PROGRESS_THREAD_TICK: Duration = Duration::from_millis(100);

/// Starts the background progress thread of `engine` once (`started` is the engine's
/// flag): it sleeps until activity (at most [`PROGRESS_THREAD_TICK`]) and progresses,
/// until the engine is dropped; between rounds it holds only a weak reference, so the
/// engine is released at most one tick after its last user. Returns false (and clears
/// the flag) when the thread cannot be started.
pub fn start_progress_thread<P: Progress>(
    engine: &Arc<P>,
    started: &AtomicBool,
    name: &str,
) -> bool {
    if started.swap(true, Ordering::AcqRel) {
        return true;
    }
    let weak: Weak<P> = Arc::downgrade(engine);
    let r = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            while let Some(p) = weak.upgrade() {
                p.sleep(None, Some(Instant::now() + PROGRESS_THREAD_TICK));
                p.poll_full();
            }
        });
    match r {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("{name}: cannot start the progress thread: {e}");
            started.store(false, Ordering::Release);
            false
        }
    }
}

/// The blocking read every provider queue does: progress, take, sleep, until
/// something arrives or the timeout passes.
fn sread_with<P: Progress, T>(
    p: &P,
    queue: &WaitQueue<T>,
    out: &mut Vec<T>,
    max: usize,
    timeout: Option<Duration>,
) -> usize {
    queue.sread(
        out,
        max.max(1),
        timeout,
        || p.poll_full(),
        |fd, deadline| p.sleep(Some(fd), deadline),
    )
}

/// A provider's completion queue: a [`WaitQueue`] of completions that the provider
/// pushes into, read with its progress engine.
pub struct ProviderCq<P: Progress> {
    queue: Arc<WaitQueue<Completion>>,
    progress: Arc<P>,
}

impl<P: Progress> ProviderCq<P> {
    /// A queue reading `queue` with `progress`.
    pub fn new(queue: Arc<WaitQueue<Completion>>, progress: Arc<P>) -> Self {
        ProviderCq { queue, progress }
    }
    /// A fresh queue read with `progress`, as a provider's `open_cq` returns it.
    pub fn open(progress: &Arc<P>) -> Result<Arc<dyn CqOps>> {
        let queue = Arc::new(WaitQueue::new()?);
        Ok(Arc::new(ProviderCq::new(queue, progress.clone())))
    }
    /// The queue the provider pushes completions into.
    pub fn queue(&self) -> &Arc<WaitQueue<Completion>> {
        &self.queue
    }
    /// The progress engine.
    pub fn progress(&self) -> &Arc<P> {
        &self.progress
    }
    /// The queue behind `cq` for an endpoint of `provider` bound with `progress`:
    /// refused when `cq` is another provider's or another engine's.
    pub fn queue_of(
        cq: &Arc<dyn CqOps>,
        progress: &Arc<P>,
        provider: &str,
    ) -> Result<Arc<WaitQueue<Completion>>> {
        let cq = cq.as_any().downcast_ref::<Self>().ok_or_else(|| {
            Error::invalid(format!(
                "the completion queue is not from the {provider} provider"
            ))
        })?;
        if !Arc::ptr_eq(&cq.progress, progress) {
            return Err(Error::invalid(
                "the completion queue belongs to another fabric",
            ));
        }
        Ok(cq.queue.clone())
    }
}

impl<P: Progress> CqOps for ProviderCq<P> {
    fn read(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        self.progress.poll();
        Ok(self.queue.pop_into(out, max))
    }
    fn read_one(&self) -> Result<Option<Completion>> {
        self.progress.poll();
        Ok(self.queue.pop())
    }
    fn sread(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        Ok(sread_with(&*self.progress, &self.queue, out, max, timeout))
    }
    fn register_waker(&self, waker: &Waker) {
        self.progress.start_auto();
        self.queue.register_waker(waker);
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A provider's event queue.
pub struct ProviderEq<P: Progress> {
    queue: Arc<WaitQueue<Event>>,
    progress: Arc<P>,
}

impl<P: Progress> ProviderEq<P> {
    /// A queue reading `queue` with `progress`.
    pub fn new(queue: Arc<WaitQueue<Event>>, progress: Arc<P>) -> Self {
        ProviderEq { queue, progress }
    }
    /// A fresh queue read with `progress`, as a provider's `open_eq` returns it.
    pub fn open(progress: &Arc<P>) -> Result<Arc<dyn EqOps>> {
        let queue = Arc::new(WaitQueue::new()?);
        Ok(Arc::new(ProviderEq::new(queue, progress.clone())))
    }
    /// The queue the provider pushes events into.
    pub fn queue(&self) -> &Arc<WaitQueue<Event>> {
        &self.queue
    }
    /// The progress engine.
    pub fn progress(&self) -> &Arc<P> {
        &self.progress
    }
    /// The queue behind `eq` for an object of `provider` opened with `progress`:
    /// refused when `eq` is another provider's or another engine's.
    pub fn queue_of(
        eq: &Arc<dyn EqOps>,
        progress: &Arc<P>,
        provider: &str,
    ) -> Result<Arc<WaitQueue<Event>>> {
        let eq = eq.as_any().downcast_ref::<Self>().ok_or_else(|| {
            Error::invalid(format!(
                "the event queue is not from the {provider} provider"
            ))
        })?;
        if !Arc::ptr_eq(&eq.progress, progress) {
            return Err(Error::invalid("the event queue belongs to another fabric"));
        }
        Ok(eq.queue.clone())
    }
}

impl<P: Progress> EqOps for ProviderEq<P> {
    fn read(&self) -> Result<Option<Event>> {
        self.progress.poll_full();
        Ok(self.queue.pop())
    }
    fn sread(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        let mut v = Vec::new();
        sread_with(&*self.progress, &self.queue, &mut v, 1, timeout);
        Ok(v.pop())
    }
    fn register_waker(&self, waker: &Waker) {
        self.progress.start_auto();
        self.queue.register_waker(waker);
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::CompFlags;
    use std::sync::atomic::AtomicUsize;

    /// An engine whose "device" produces one completion every `every` full polls.
    struct Fake {
        cq: Arc<WaitQueue<Completion>>,
        polls: AtomicUsize,
        full: AtomicUsize,
        sleeps: AtomicUsize,
        auto: AtomicBool,
    }

    impl Progress for Fake {
        fn poll(&self) {
            self.polls.fetch_add(1, Ordering::Relaxed);
        }
        fn poll_full(&self) {
            if self.full.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
                self.cq.push(Completion::ok(7, CompFlags::SEND, 0));
            }
        }
        fn sleep(&self, _fd: Option<RawFd>, deadline: Option<Instant>) {
            self.sleeps.fetch_add(1, Ordering::Relaxed);
            let d = deadline.map_or(Duration::from_millis(1), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(1))
            });
            std::thread::sleep(d);
        }
        fn start_auto(self: &Arc<Self>) {
            start_progress_thread(self, &self.auto, "fake-progress");
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            cq: Arc::new(WaitQueue::new().unwrap()),
            polls: AtomicUsize::new(0),
            full: AtomicUsize::new(0),
            sleeps: AtomicUsize::new(0),
            auto: AtomicBool::new(false),
        })
    }

    #[test]
    fn reads_progress_and_blocking_reads_sleep_until_the_engine_delivers() {
        let f = fake();
        let cq = ProviderCq::new(f.cq.clone(), f.clone());
        let mut v = Vec::new();
        assert_eq!(cq.read(&mut v, 4).unwrap(), 0);
        assert_eq!(f.polls.load(Ordering::Relaxed), 1);
        assert_eq!(
            cq.sread(&mut v, 4, Some(Duration::from_secs(5))).unwrap(),
            1
        );
        assert_eq!(v[0].context, 7);
        assert!(f.full.load(Ordering::Relaxed) >= 3);
        assert!(f.sleeps.load(Ordering::Relaxed) >= 1);
        // A timeout with nothing to deliver returns 0.
        let idle = fake();
        let q = ProviderEq::new(Arc::new(WaitQueue::new().unwrap()), idle.clone());
        let t = Instant::now();
        assert!(q.sread(Some(Duration::from_millis(20))).unwrap().is_none());
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn read_one_progresses_and_takes_in_order_like_read() {
        let f = fake();
        let cq = ProviderCq::new(f.cq.clone(), f.clone());
        assert!(cq.read_one().unwrap().is_none());
        assert_eq!(f.polls.load(Ordering::Relaxed), 1, "one progress per read");
        f.cq.push(Completion::ok(1, CompFlags::SEND, 0));
        f.cq.push(Completion::ok(2, CompFlags::RECV, 5));
        assert_eq!(cq.read_one().unwrap().map(|c| c.context), Some(1));
        let c = cq.read_one().unwrap().expect("the second");
        assert_eq!((c.context, c.len), (2, 5));
        assert!(cq.read_one().unwrap().is_none());
        assert_eq!(f.polls.load(Ordering::Relaxed), 4);
        // The trait's default (a provider that implements only `read`) agrees.
        struct OnlyRead(Arc<WaitQueue<Completion>>);
        impl CqOps for OnlyRead {
            fn read(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
                Ok(self.0.pop_into(out, max))
            }
            fn sread(
                &self,
                _: &mut Vec<Completion>,
                _: usize,
                _: Option<Duration>,
            ) -> Result<usize> {
                Ok(0)
            }
            fn register_waker(&self, _: &Waker) {}
            fn as_any(&self) -> &dyn Any {
                self
            }
        }
        let q = Arc::new(WaitQueue::new().unwrap());
        let o = OnlyRead(q.clone());
        q.push(Completion::ok(9, CompFlags::SEND, 0));
        assert_eq!(o.read_one().unwrap().map(|c| c.context), Some(9));
        assert!(o.read_one().unwrap().is_none());
    }

    #[test]
    fn queue_of_accepts_only_this_engines_queues() {
        let f = fake();
        let other = fake();
        let cq: Arc<dyn CqOps> = Arc::new(ProviderCq::new(f.cq.clone(), f.clone()));
        let q = ProviderCq::queue_of(&cq, &f, "fake").unwrap();
        assert!(Arc::ptr_eq(&q, &f.cq));
        let e = ProviderCq::queue_of(&cq, &other, "fake").err().unwrap();
        assert!(e.to_string().contains("another fabric"), "{e}");
        let eq: Arc<dyn EqOps> = Arc::new(ProviderEq::new(
            Arc::new(WaitQueue::new().unwrap()),
            f.clone(),
        ));
        assert!(ProviderEq::queue_of(&eq, &f, "fake").is_ok());
        assert!(ProviderEq::queue_of(&eq, &other, "fake").is_err());
        // Another provider's queue (another engine type) is named as such.
        struct Other;
        impl Progress for Other {
            fn poll(&self) {}
            fn poll_full(&self) {}
            fn sleep(&self, _: Option<RawFd>, _: Option<Instant>) {}
            fn start_auto(self: &Arc<Self>) {}
        }
        let e = ProviderCq::queue_of(&cq, &Arc::new(Other), "other")
            .err()
            .unwrap();
        assert!(e.to_string().contains("not from the other provider"), "{e}");
    }

    #[test]
    fn a_waker_starts_one_progress_thread_that_ends_with_the_engine() {
        let f = fake();
        let cq = ProviderCq::new(f.cq.clone(), f.clone());
        let waker = std::task::Waker::noop();
        cq.register_waker(waker);
        cq.register_waker(waker);
        assert!(f.auto.load(Ordering::Acquire));
        // The thread progresses without any reader.
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.cq.is_empty() {
            assert!(Instant::now() < deadline, "no background progress");
            std::thread::sleep(Duration::from_millis(1));
        }
        let weak = Arc::downgrade(&f);
        drop(cq);
        drop(f);
        // The thread holds only a weak reference between rounds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while weak.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the thread kept the engine alive"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
