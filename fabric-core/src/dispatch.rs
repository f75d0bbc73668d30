//! Per-operation futures: completions routed to the operation that posted them.
//!
//! A completion queue is shared by every operation of the endpoints bound to it, so a
//! queue-level stream ([`AsyncCompletions`](crate::AsyncCompletions)) hands each
//! completion to whichever task polls next — fine for one task that owns the queue,
//! wrong for several tasks that each wait for their own operation. The `*_async`
//! methods of [`Endpoint`](crate::Endpoint) solve that: each posts with a context
//! that the queue's dispatcher allocated, and its future resolves with exactly that
//! operation's completion, whichever task happened to drain the queue.
//!
//! How it works: the dispatcher lives in the [`CompletionQueue`] (shared by its
//! clones). A pending operation future drains the queue when polled and routes every
//! completion: its own ends the future, another future's is stored in that future's
//! slot (and its task woken), and any other completion (an operation posted with a
//! context of the application's own) is kept for the queue's ordinary readers, which
//! see it on their next `read`/`sread`/`wait`. While no operation future is pending
//! and nothing is kept, the queue's readers pay one atomic load.
//!
//! Contexts with bit 63 set ([`DISPATCH_CONTEXT_BIT`]) are the dispatcher's; an
//! application that mixes its own contexts with operation futures on one queue keeps
//! that bit clear in its own.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::cq::{Completion, CompletionQueue};
use crate::error::{Error, Result};
use crate::provider::CqOps;

/// Contexts with this bit set are allocated by the dispatcher for operation futures.
pub const DISPATCH_CONTEXT_BIT: u64 = 1 << 63;

/// How many completions one drain takes from the provider.
const DRAIN_BATCH: usize = 64;

enum Slot {
    /// Posted; the waker of the task awaiting it, once polled.
    Waiting(Option<Waker>),
    /// Its completion arrived before the future looked.
    Done(Completion),
    /// The future was dropped: its completion is discarded when it comes.
    Abandoned,
}

#[derive(Default)]
struct State {
    next: u64,
    slots: HashMap<u64, Slot>,
    /// Completions that belong to no operation future, for the queue's readers.
    kept: VecDeque<Completion>,
}

/// The routing state of one completion queue.
#[derive(Default)]
pub(crate) struct Dispatch {
    state: Mutex<State>,
    /// Slots that exist (waiting, done or abandoned).
    slots: AtomicUsize,
    /// Completions in `kept`.
    kept: AtomicUsize,
}

impl Dispatch {
    /// Whether readers must go through the dispatcher.
    pub(crate) fn active(&self) -> bool {
        self.slots.load(Ordering::Acquire) != 0 || self.kept.load(Ordering::Acquire) != 0
    }

    /// A fresh context and its slot.
    fn allocate(&self) -> u64 {
        let mut st = self.state.lock();
        let ctx = loop {
            st.next = st.next.wrapping_add(1) & !DISPATCH_CONTEXT_BIT;
            let c = DISPATCH_CONTEXT_BIT | st.next;
            if !st.slots.contains_key(&c) {
                break c;
            }
        };
        st.slots.insert(ctx, Slot::Waiting(None));
        self.slots.fetch_add(1, Ordering::AcqRel);
        ctx
    }

    /// Frees a slot whose post failed (nothing will complete).
    fn release(&self, ctx: u64) {
        if self.state.lock().slots.remove(&ctx).is_some() {
            self.slots.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Routes completions read from the provider; returns those for the caller
    /// (belonging to no operation future) in `out`.
    fn route(&self, st: &mut State, batch: &mut Vec<Completion>, out: &mut Vec<Completion>) {
        for c in batch.drain(..) {
            match st.slots.get_mut(&c.context) {
                Some(Slot::Waiting(w)) => {
                    let w = w.take();
                    st.slots.insert(c.context, Slot::Done(c));
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                Some(Slot::Abandoned) => {
                    st.slots.remove(&c.context);
                    self.slots.fetch_sub(1, Ordering::AcqRel);
                }
                // A second completion for a finished context cannot happen; keep it
                // for the readers rather than lose it.
                Some(Slot::Done(_)) | None => out.push(c),
            }
        }
    }

    /// `read` through the dispatcher: kept completions first, then the provider's,
    /// with operation futures' completions routed to them.
    pub(crate) fn read(
        &self,
        ops: &dyn CqOps,
        out: &mut Vec<Completion>,
        max: usize,
    ) -> Result<usize> {
        let start = out.len();
        let mut st = self.state.lock();
        while out.len() - start < max {
            match st.kept.pop_front() {
                Some(c) => {
                    self.kept.fetch_sub(1, Ordering::AcqRel);
                    out.push(c);
                }
                None => break,
            }
        }
        let room = max - (out.len() - start);
        if room > 0 {
            let mut batch = Vec::with_capacity(room);
            ops.read(&mut batch, room)?;
            self.route(&mut st, &mut batch, out);
        }
        Ok(out.len() - start)
    }

    /// Routes completions that a blocking provider read returned.
    pub(crate) fn route_read(&self, batch: &mut Vec<Completion>, out: &mut Vec<Completion>) {
        let mut st = self.state.lock();
        self.route(&mut st, batch, out);
    }

    /// Drains the provider into the slots (others' completions are kept) and looks at
    /// slot `ctx`.
    fn poll_op(&self, ops: &dyn CqOps, ctx: u64, waker: &Waker) -> Poll<Result<Completion>> {
        for attempt in 0..2 {
            let mut st = self.state.lock();
            let mut batch = Vec::new();
            let mut others = Vec::new();
            loop {
                match ops.read(&mut batch, DRAIN_BATCH) {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(0) => break,
                    Ok(_) => self.route(&mut st, &mut batch, &mut others),
                }
            }
            if !others.is_empty() {
                self.kept.fetch_add(others.len(), Ordering::AcqRel);
                st.kept.extend(others);
            }
            match st.slots.remove(&ctx) {
                Some(Slot::Done(c)) => {
                    self.slots.fetch_sub(1, Ordering::AcqRel);
                    return Poll::Ready(Ok(c));
                }
                Some(_) | None => {
                    st.slots.insert(ctx, Slot::Waiting(Some(waker.clone())));
                }
            }
            drop(st);
            if attempt == 0 {
                // Ask the provider to wake us (and to progress in the background),
                // then look once more so a completion that raced in is not missed.
                ops.register_waker(waker);
            }
        }
        Poll::Pending
    }

    fn abandon(&self, ctx: u64) {
        let mut st = self.state.lock();
        match st.slots.get(&ctx) {
            Some(Slot::Done(_)) => {
                st.slots.remove(&ctx);
                self.slots.fetch_sub(1, Ordering::AcqRel);
            }
            Some(_) => {
                st.slots.insert(ctx, Slot::Abandoned);
            }
            None => {}
        }
    }
}

/// The completion of one posted operation (see the [module docs](self)). Resolves
/// with the completion when the operation succeeded, and with an error
/// ([`Error::from`] a [`CqError`](crate::CqError), its detail kept as the source) when
/// it completed in error. Dropping it does not cancel the operation: its completion
/// is discarded when it arrives.
#[must_use = "an operation future does nothing unless awaited; the operation is already posted"]
pub struct OpFuture {
    cq: CompletionQueue,
    ctx: u64,
    done: bool,
}

impl std::fmt::Debug for OpFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpFuture")
            .field("context", &format_args!("{:#x}", self.ctx))
            .field("done", &self.done)
            .finish()
    }
}

impl OpFuture {
    /// Allocates a context on `cq`, lets `post` post the operation with it, and
    /// returns the future of its completion (or `post`'s error, at once).
    pub(crate) fn post(
        cq: &CompletionQueue,
        post: impl FnOnce(u64) -> Result<()>,
    ) -> Result<OpFuture> {
        let d = cq.dispatch();
        let ctx = d.allocate();
        if let Err(e) = post(ctx) {
            d.release(ctx);
            return Err(e);
        }
        Ok(OpFuture {
            cq: cq.clone(),
            ctx,
            done: false,
        })
    }

    /// The context the operation was posted with.
    pub fn context(&self) -> u64 {
        self.ctx
    }
}

impl Future for OpFuture {
    type Output = Result<Completion>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            return Poll::Ready(Err(Error::invalid(
                "operation future polled after it completed",
            )));
        }
        let r = self
            .cq
            .dispatch()
            .poll_op(&**self.cq.ops(), self.ctx, cx.waker());
        match r {
            Poll::Ready(Ok(c)) => {
                self.done = true;
                Poll::Ready(match &c.status {
                    Ok(()) => Ok(c),
                    Err(e) => Err(Error::from(e.clone())),
                })
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                self.cq.dispatch().abandon(self.ctx);
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if !self.done {
            self.cq.dispatch().abandon(self.ctx);
        }
    }
}
