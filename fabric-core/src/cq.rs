//! Completion queues: blocking and non-blocking reads, error entries, and an async
//! interface.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::dispatch::Dispatch;
use crate::domain::Domain;
use crate::error::{CqError, Error, ErrorKind, Result};
use crate::flags::CompFlags;
use crate::provider::CqOps;

/// Completion queue attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqAttr {
    /// Entries the queue should hold before the provider must stall (a hint).
    pub size: usize,
}

impl Default for CqAttr {
    fn default() -> Self {
        CqAttr { size: 1024 }
    }
}

/// One completed operation, successful or not.
///
/// Non-exhaustive (fields are added as the API grows, e.g. a tag or a source
/// address): providers build one with [`ok`](Self::ok) / [`error`](Self::error) and the
/// `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completion {
    /// The context the application gave when posting. For a peer's write with remote
    /// CQ data, the context of the receive it consumed; for an error of an inject
    /// (which has no context), 0.
    pub context: u64,
    /// What completed.
    pub flags: CompFlags,
    /// Bytes transferred (for a receive: bytes placed; for a truncated receive, the
    /// bytes that fit; 0 for other errors).
    pub len: usize,
    /// Remote CQ data, valid when `flags` has `REMOTE_CQ_DATA`.
    pub data: u64,
    /// `Err` for an error completion, with the reason.
    pub status: std::result::Result<(), CqError>,
}

impl Completion {
    /// A successful completion.
    pub fn ok(context: u64, flags: CompFlags, len: usize) -> Self {
        Completion {
            context,
            flags,
            len,
            data: 0,
            status: Ok(()),
        }
    }
    /// An error completion.
    pub fn error(context: u64, flags: CompFlags, err: CqError) -> Self {
        Completion {
            context,
            flags,
            len: 0,
            data: 0,
            status: Err(err),
        }
    }
    /// The same completion carrying remote CQ data `data` (sets
    /// [`CompFlags::REMOTE_CQ_DATA`]).
    pub fn with_data(mut self, data: u64) -> Self {
        self.data = data;
        self.flags |= CompFlags::REMOTE_CQ_DATA;
        self
    }
    /// The same completion with `len` bytes transferred.
    pub fn with_len(mut self, len: usize) -> Self {
        self.len = len;
        self
    }
    /// Whether the operation succeeded.
    pub fn is_ok(&self) -> bool {
        self.status.is_ok()
    }
}

/// A completion queue. Clones share the queue.
#[derive(Clone)]
pub struct CompletionQueue {
    ops: Arc<dyn CqOps>,
    domain: Domain,
    dispatch: Arc<Dispatch>,
}

impl CompletionQueue {
    pub(crate) fn new(ops: Arc<dyn CqOps>, domain: Domain) -> Self {
        CompletionQueue {
            ops,
            domain,
            dispatch: Arc::default(),
        }
    }
    /// The routing state of operation futures on this queue.
    pub(crate) fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }
    /// The next completion without blocking and without allocating, through the
    /// dispatcher when operation futures use the queue.
    fn read_one_routed(&self) -> Result<Option<Completion>> {
        if !self.dispatch.active() {
            return self.ops.read_one();
        }
        let mut v = Vec::with_capacity(1);
        self.dispatch.read(&*self.ops, &mut v, 1)?;
        Ok(v.pop())
    }
    /// Reads without blocking, through the dispatcher when operation futures use the
    /// queue.
    fn read_routed(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        if self.dispatch.active() {
            self.dispatch.read(&*self.ops, out, max)
        } else {
            self.ops.read(out, max)
        }
    }
    /// A blocking provider read whose result is routed when operation futures use the
    /// queue; may return 0 before the timeout when everything it read was theirs.
    fn sread_routed(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        if !self.dispatch.active() {
            return self.ops.sread(out, max, timeout);
        }
        let n = self.dispatch.read(&*self.ops, out, max)?;
        if n > 0 {
            return Ok(n);
        }
        let mut batch = Vec::with_capacity(max);
        self.ops.sread(&mut batch, max, timeout)?;
        let start = out.len();
        self.dispatch.route_read(&mut batch, out);
        Ok(out.len() - start)
    }
    /// The provider's object.
    pub fn ops(&self) -> &Arc<dyn CqOps> {
        &self.ops
    }
    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Appends up to `max` completions to `out` without blocking (driving progress in
    /// manual mode); returns how many.
    pub fn read(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        self.read_routed(out, max)
    }

    /// Like [`read`](Self::read), but sleeps up to `timeout` (`None`: forever) for at
    /// least one completion; returns 0 on timeout.
    pub fn sread(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        self.sread_routed(out, max, timeout)
    }

    /// The next completion, without blocking.
    pub fn try_next(&self) -> Result<Option<Completion>> {
        self.read_one_routed()
    }

    /// Waits (sleeping) for the next completion; `ErrorKind::TimedOut` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        let mut v = Vec::with_capacity(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.sread_routed(&mut v, 1, Some(left))? > 0 {
                if let Some(c) = v.pop() {
                    return Ok(c);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("no completion within {timeout:?}"),
                ));
            }
        }
    }

    /// Polls (busy, no sleeping) for the next completion; `ErrorKind::TimedOut` after
    /// `timeout`. The lowest-latency way to wait.
    pub fn poll_wait(&self, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.read_one_routed()? {
                return Ok(c);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("no completion within {timeout:?}"),
                ));
            }
        }
    }
}

/// Awaiting completions from async code (tokio or any executor). While a task waits,
/// the provider makes progress in the background.
#[async_trait]
pub trait AsyncCompletions {
    /// The next completion.
    async fn next_completion(&self) -> Result<Completion>;
    /// Up to `max` completions, at least one.
    async fn read_async(&self, max: usize) -> Result<Vec<Completion>>;
}

struct ReadFuture<'a> {
    cq: &'a CompletionQueue,
    max: usize,
}

impl Future for ReadFuture<'_> {
    type Output = Result<Vec<Completion>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut v = Vec::new();
        match self.cq.read_routed(&mut v, self.max) {
            Err(e) => return Poll::Ready(Err(e)),
            Ok(n) if n > 0 => return Poll::Ready(Ok(v)),
            Ok(_) => {}
        }
        self.cq.ops.register_waker(cx.waker());
        // Re-check after registering so a completion that raced in is not missed.
        match self.cq.read_routed(&mut v, self.max) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(n) if n > 0 => Poll::Ready(Ok(v)),
            Ok(_) => Poll::Pending,
        }
    }
}

#[async_trait]
impl AsyncCompletions for CompletionQueue {
    async fn next_completion(&self) -> Result<Completion> {
        let mut v = ReadFuture { cq: self, max: 1 }.await?;
        v.pop()
            .ok_or_else(|| Error::new(ErrorKind::Other, "provider returned no completion"))
    }
    async fn read_async(&self, max: usize) -> Result<Vec<Completion>> {
        ReadFuture {
            cq: self,
            max: max.max(1),
        }
        .await
    }
}
