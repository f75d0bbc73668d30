//! Atomic operations on connected endpoints (libfabric `fi_atomic(3)`), and the
//! operation and datatype enums every layer shares (the RDM layer re-exports them).
//!
//! Three forms, as in libfabric: [`Endpoint::atomic`] (no result),
//! [`Endpoint::fetch_atomic`] (the target's old values land in a local result range)
//! and [`Endpoint::compare_atomic`] (compare-and-swap, old values fetched), against a
//! peer's range named by a [`RemoteIov`] (address + key, as for RMA). Operands and
//! results are arrays of the datatype in the **host's byte order**, as libfabric's
//! buffers are; operands are read at the call (from a registered range, or from a
//! slice with the `*msg` forms and [`Endpoint::inject_atomic`]). Completions come as
//! for RMA, on the transmit queue, with [`CompFlags::ATOMIC`](crate::CompFlags) and
//! `READ` (fetching forms) or `WRITE`; a refused remote access (key, bounds, rights, a
//! misaligned address where the provider needs alignment) is an error completion and,
//! as for RMA, ends the connection ("one set of semantics" in the crate docs).
//!
//! [`Endpoint::atomicvalid`], [`Endpoint::fetch_atomicvalid`] and
//! [`Endpoint::compare_atomicvalid`] say, per (operation, datatype), what the
//! provider executes natively: the most elements one call may carry, or `None`. A
//! provider offers the class by answering [`Caps::ATOMIC`] in getinfo and returning
//! [`AtomicOps`] from [`EndpointOps::atomic`](crate::provider::EndpointOps::atomic).
//!
//! ## Executing at a target with the CPU
//! [`execute_cpu`] applies an operation to host memory with the CPU's atomic
//! instructions (a compare-exchange loop per naturally aligned element). Providers that
//! execute atomics in software (softroce's responder) and the RDM layer's emulated
//! path both use it, so atomics arriving by either path on one aligned word are atomic
//! with respect to each other and to the application's own atomic instructions.

use crate::endpoint::{segments, Endpoint};
use crate::error::{Error, Result};
use crate::flags::{Access, Caps, OpFlags};
use crate::memory::{LocalIov, RemoteIov, Segment};
use crate::provider::AtomicOps;

/// An atomic operation (libfabric `enum fi_op`, the subset the library knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AtomicOp {
    /// `t = min(t, o)`.
    Min,
    /// `t = max(t, o)`.
    Max,
    /// `t = t + o` (wrapping for integers); with a fetch, fetch-and-add.
    Sum,
    /// `t = t | o`.
    Bor,
    /// `t = t & o`.
    Band,
    /// `t = t ^ o`.
    Bxor,
    /// Reads `t` (fetching forms only).
    Read,
    /// `t = o`; with a fetch, swap.
    Write,
    /// `if t == c { t = o }` (compare forms only), fetching the old `t`.
    Cswap,
}

/// An element type (libfabric `enum fi_datatype`, the subset the library knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Datatype {
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
}

impl Datatype {
    /// Every datatype.
    pub const ALL: [Datatype; 6] = [
        Datatype::U32,
        Datatype::U64,
        Datatype::I32,
        Datatype::I64,
        Datatype::F32,
        Datatype::F64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Datatype::U32 | Datatype::I32 | Datatype::F32 => 4,
            Datatype::U64 | Datatype::I64 | Datatype::F64 => 8,
        }
    }

    /// A stable one-byte code (for wire formats).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The datatype of a [`code`](Self::code).
    pub fn from_code(c: u8) -> Option<Datatype> {
        Self::ALL.into_iter().find(|d| d.code() == c)
    }

    /// Whether it is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Datatype::F32 | Datatype::F64)
    }
}

impl AtomicOp {
    /// Every operation.
    pub const ALL: [AtomicOp; 9] = [
        AtomicOp::Min,
        AtomicOp::Max,
        AtomicOp::Sum,
        AtomicOp::Bor,
        AtomicOp::Band,
        AtomicOp::Bxor,
        AtomicOp::Read,
        AtomicOp::Write,
        AtomicOp::Cswap,
    ];

    /// A stable one-byte code (for wire formats).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The operation of a [`code`](Self::code).
    pub fn from_code(c: u8) -> Option<AtomicOp> {
        Self::ALL.into_iter().find(|o| o.code() == c)
    }

    /// Whether the operation may change the target (all but `Read`).
    pub fn modifies(self) -> bool {
        self != AtomicOp::Read
    }
}

/// Which form of atomic call an operation is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AtomicForm {
    /// `atomic` (no result).
    Plain,
    /// `fetch_atomic` (the old values come back).
    Fetch,
    /// `compare_atomic`.
    Compare,
}

impl AtomicForm {
    /// Whether `op` may be used in this form at all (whatever the provider): `Cswap`
    /// only as `Compare` and `Compare` only with `Cswap`; `Read` only as `Fetch`.
    pub fn allows(self, op: AtomicOp) -> bool {
        match (self, op) {
            (AtomicForm::Compare, AtomicOp::Cswap) => true,
            (AtomicForm::Compare, _) | (_, AtomicOp::Cswap) => false,
            (AtomicForm::Plain, AtomicOp::Read) => false,
            _ => true,
        }
    }
}

/// An atomic operation, validated, as the provider receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AtomicRequest {
    /// The operation.
    pub op: AtomicOp,
    /// The element type.
    pub datatype: Datatype,
    /// The form.
    pub form: AtomicForm,
    /// Operand elements, host byte order, copied at the call (1 to the provider's
    /// count of them).
    pub operand: Vec<u8>,
    /// Compare elements (`Compare` form only, else empty), host byte order.
    pub compare: Vec<u8>,
    /// Where the old values go (`Fetch` / `Compare`), as long as the operand.
    pub result: Option<Segment>,
    /// The target range, as long as the operand.
    pub remote: RemoteIov,
    /// The application's context.
    pub context: u64,
    /// Flags (completion level, fence, inject...).
    pub flags: OpFlags,
    /// Whether a successful completion is wanted.
    pub completion: bool,
}

impl AtomicRequest {
    /// Elements in the operation.
    pub fn count(&self) -> usize {
        self.operand.len() / self.datatype.size()
    }

    /// The checks of a provider that executes this as an RC atomic (InfiniBand
    /// FETCH_ADD / CMP_SWAP: one 8-byte element at an 8-byte aligned remote address).
    /// `native` says whether the provider executes (op, datatype, form) natively.
    /// Errors name `provider`: not native or not one element is `Unsupported`; a
    /// misaligned remote address is `InvalidArgument`, refused at the call so the
    /// connection is unaffected (a device would send it and the target's NAK would
    /// end the connection).
    pub fn check_rc(&self, provider: &str, native: bool) -> Result<()> {
        if !native || self.operand.len() != 8 {
            return Err(Error::unsupported(format!(
                "{provider}: {:?} on {:?} ({:?}, {} bytes) is not an RC atomic",
                self.op,
                self.datatype,
                self.form,
                self.operand.len()
            )));
        }
        if !self.remote.addr.is_multiple_of(8) {
            return Err(Error::invalid(format!(
                "{provider}: the atomic's remote address {:#x} is not 8-byte aligned",
                self.remote.addr
            )));
        }
        Ok(())
    }
}

/// An atomic message for [`Endpoint::atomicmsg`], [`Endpoint::fetch_atomicmsg`] and
/// [`Endpoint::compare_atomicmsg`] (libfabric `struct fi_msg_atomic`).
#[derive(Debug, Clone, Copy)]
pub struct AtomicMsg<'a> {
    /// The operation.
    pub op: AtomicOp,
    /// The element type.
    pub datatype: Datatype,
    /// Operand elements, host byte order (copied at the call).
    pub operand: &'a [u8],
    /// Compare elements for `compare_atomicmsg` (else empty), host byte order.
    pub compare: &'a [u8],
    /// Where the old values go (fetching forms), a registered range with READ access.
    pub result: Option<LocalIov<'a>>,
    /// The target range.
    pub remote: RemoteIov,
    /// The application's context.
    pub context: u64,
}

impl Endpoint {
    fn atomic_ops(&self, what: &str) -> Result<&dyn AtomicOps> {
        self.ops.atomic().ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: the provider's endpoint has no atomic operations"
            ))
        })
    }

    fn valid_form(&self, op: AtomicOp, dt: Datatype, form: AtomicForm) -> Option<usize> {
        if !form.allows(op) || !self.info.caps.contains(Caps::ATOMIC) {
            return None;
        }
        self.ops
            .atomic()
            .and_then(|a| a.valid(op, dt, form))
            .filter(|n| *n > 0)
    }

    /// Whether the provider's native atomics are atomic with respect to CPU atomic
    /// instructions on the target word too (by the target's application, or by
    /// software such as the RDM layer's emulated path), not only with respect to each
    /// other ([`AtomicOps::cpu_coherent`]: softroce yes; verbs when the device says
    /// `IBV_ATOMIC_GLOB`). `false` when the endpoint has no atomics.
    pub fn atomic_cpu_coherent(&self) -> bool {
        self.info.caps.contains(Caps::ATOMIC) && self.ops.atomic().is_some_and(|a| a.cpu_coherent())
    }

    /// libfabric's `fi_atomicvalid`: the most elements one [`atomic`](Self::atomic)
    /// call may carry for `op` on `dt` as the provider executes it natively, or `None`
    /// when it does not.
    pub fn atomicvalid(&self, op: AtomicOp, dt: Datatype) -> Option<usize> {
        self.valid_form(op, dt, AtomicForm::Plain)
    }

    /// libfabric's `fi_fetch_atomicvalid`, for [`fetch_atomic`](Self::fetch_atomic).
    pub fn fetch_atomicvalid(&self, op: AtomicOp, dt: Datatype) -> Option<usize> {
        self.valid_form(op, dt, AtomicForm::Fetch)
    }

    /// libfabric's `fi_compare_atomicvalid`, for
    /// [`compare_atomic`](Self::compare_atomic) (`op` is [`AtomicOp::Cswap`]).
    pub fn compare_atomicvalid(&self, op: AtomicOp, dt: Datatype) -> Option<usize> {
        self.valid_form(op, dt, AtomicForm::Compare)
    }

    /// A non-fetching atomic (`fi_atomic`): applies `op` with the operand elements in
    /// `operand` (a registered range with WRITE access, as an RMA write source; read at
    /// the call) to the peer's range `remote`.
    pub fn atomic(
        &self,
        op: AtomicOp,
        dt: Datatype,
        operand: LocalIov<'_>,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        let operand = read_local(self, &operand, Access::WRITE, "atomic operand")?;
        self.atomicmsg(
            &AtomicMsg {
                op,
                datatype: dt,
                operand: &operand,
                compare: &[],
                result: None,
                remote,
                context,
            },
            OpFlags::COMPLETION,
        )
    }

    /// A fetching atomic (`fi_fetch_atomic`): as [`atomic`](Self::atomic), and the
    /// target's old values land in `result` (READ access, as an RMA read destination).
    /// `Sum` is fetch-and-add, `Write` swap, `Read` an atomic read.
    pub fn fetch_atomic(
        &self,
        op: AtomicOp,
        dt: Datatype,
        operand: LocalIov<'_>,
        result: LocalIov<'_>,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        let operand = read_local(self, &operand, Access::WRITE, "fetch_atomic operand")?;
        self.fetch_atomicmsg(
            &AtomicMsg {
                op,
                datatype: dt,
                operand: &operand,
                compare: &[],
                result: Some(result),
                remote,
                context,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Compare-and-swap (`fi_compare_atomic` with `FI_CSWAP`): where the target equals
    /// `compare` it becomes `operand`; the old values land in `result`.
    #[allow(clippy::too_many_arguments)]
    pub fn compare_atomic(
        &self,
        dt: Datatype,
        operand: LocalIov<'_>,
        compare: LocalIov<'_>,
        result: LocalIov<'_>,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        let operand = read_local(self, &operand, Access::WRITE, "compare_atomic operand")?;
        let compare = read_local(self, &compare, Access::WRITE, "compare_atomic compare")?;
        self.compare_atomicmsg(
            &AtomicMsg {
                op: AtomicOp::Cswap,
                datatype: dt,
                operand: &operand,
                compare: &compare,
                result: Some(result),
                remote,
                context,
            },
            OpFlags::COMPLETION,
        )
    }

    /// A non-fetching atomic whose operand is copied at the call, with no completion
    /// (`fi_inject_atomic`); errors still complete in error.
    pub fn inject_atomic(
        &self,
        op: AtomicOp,
        dt: Datatype,
        operand: &[u8],
        remote: RemoteIov,
    ) -> Result<()> {
        self.atomicmsg(
            &AtomicMsg {
                op,
                datatype: dt,
                operand,
                compare: &[],
                result: None,
                remote,
                context: 0,
            },
            OpFlags::INJECT,
        )
    }

    /// `fi_atomicmsg`: a non-fetching atomic with explicit flags (`COMPLETION`,
    /// `INJECT`, `FENCE`, the completion levels up to `DELIVERY_COMPLETE`).
    pub fn atomicmsg(&self, msg: &AtomicMsg<'_>, flags: OpFlags) -> Result<()> {
        self.post_atomic(AtomicForm::Plain, msg, flags, "atomic")
    }

    /// `fi_fetch_atomicmsg`: a fetching atomic with explicit flags.
    pub fn fetch_atomicmsg(&self, msg: &AtomicMsg<'_>, flags: OpFlags) -> Result<()> {
        self.post_atomic(AtomicForm::Fetch, msg, flags, "fetch_atomic")
    }

    /// `fi_compare_atomicmsg`: compare-and-swap with explicit flags.
    pub fn compare_atomicmsg(&self, msg: &AtomicMsg<'_>, flags: OpFlags) -> Result<()> {
        self.post_atomic(AtomicForm::Compare, msg, flags, "compare_atomic")
    }

    /// [`fetch_atomicmsg`](Self::fetch_atomicmsg) with a completion to await
    /// (`msg.context` is replaced by the dispatcher's).
    pub fn fetch_atomicmsg_async(
        &self,
        msg: &AtomicMsg<'_>,
        flags: OpFlags,
    ) -> Result<crate::OpFuture> {
        if flags.contains(OpFlags::INJECT) {
            return Err(Error::invalid(
                "fetch_atomicmsg_async: INJECT does not apply to a fetching atomic",
            ));
        }
        crate::OpFuture::post(&self.tx_cq, |ctx| {
            self.fetch_atomicmsg(
                &AtomicMsg {
                    context: ctx,
                    ..*msg
                },
                flags | OpFlags::COMPLETION,
            )
        })
    }

    fn post_atomic(
        &self,
        form: AtomicForm,
        msg: &AtomicMsg<'_>,
        flags: OpFlags,
        what: &str,
    ) -> Result<()> {
        self.check_caps(Caps::ATOMIC, what)?;
        let ops = self.atomic_ops(what)?;
        let (op, dt) = (msg.op, msg.datatype);
        if flags.intersects(OpFlags::REMOTE_CQ_DATA | OpFlags::COMMIT_COMPLETE) {
            return Err(Error::invalid(format!(
                "{what}: REMOTE_CQ_DATA and COMMIT_COMPLETE do not apply to atomics"
            )));
        }
        if flags.contains(OpFlags::INJECT) && form != AtomicForm::Plain {
            return Err(Error::invalid(format!(
                "{what}: INJECT applies to non-fetching atomics only"
            )));
        }
        let max = self.valid_form(op, dt, form).ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: {op:?} on {dt:?} is not supported by the provider ({} endpoint) in this form",
                self.info.provider_name
            ))
        })?;
        let size = dt.size();
        let n = msg.operand.len();
        if n == 0 || !n.is_multiple_of(size) || n / size > max {
            return Err(Error::invalid(format!(
                "{what}: the operand must be 1 to {max} elements of {size} bytes, not {n} bytes"
            )));
        }
        match form {
            AtomicForm::Compare if msg.compare.len() != n => {
                return Err(Error::invalid(format!(
                    "{what}: {} compare bytes for {n} operand bytes",
                    msg.compare.len()
                )))
            }
            AtomicForm::Plain | AtomicForm::Fetch if !msg.compare.is_empty() => {
                return Err(Error::invalid(format!(
                    "{what}: compare values apply to compare_atomic only"
                )))
            }
            _ => {}
        }
        if msg.remote.len != n {
            return Err(Error::invalid(format!(
                "{what}: the remote range has {} bytes, the operand {n}",
                msg.remote.len
            )));
        }
        let result = match (form, &msg.result) {
            (AtomicForm::Plain, Some(_)) => {
                return Err(Error::invalid(format!(
                    "{what}: a non-fetching atomic has no result buffer"
                )))
            }
            (AtomicForm::Plain, None) => None,
            (_, None) => {
                return Err(Error::invalid(format!(
                    "{what}: a fetching atomic needs a result buffer"
                )))
            }
            (_, Some(r)) => {
                if r.len != n {
                    return Err(Error::invalid(format!(
                        "{what}: the result buffer has {} bytes, the operand {n}",
                        r.len
                    )));
                }
                let mut s = segments(std::slice::from_ref(r), self.domain(), Access::READ, what)?;
                s.pop()
            }
        };
        ops.post_atomic(AtomicRequest {
            op,
            datatype: dt,
            form,
            operand: msg.operand.to_vec(),
            compare: msg.compare.to_vec(),
            result,
            remote: msg.remote,
            context: msg.context,
            flags,
            completion: self.wants_completion(flags),
        })
    }
}

fn read_local(ep: &Endpoint, iov: &LocalIov<'_>, need: Access, what: &str) -> Result<Vec<u8>> {
    let mut s = segments(std::slice::from_ref(iov), ep.domain(), need, what)?;
    Ok(s.pop().map(|s| s.to_vec()).unwrap_or_default())
}

// ---- execution at a target ----

/// The new value of one element, all values as raw bits in the low bytes of a `u64`
/// (host order after `from_ne_bytes`).
fn combine(op: AtomicOp, dt: Datatype, t: u64, o: u64, c: u64) -> u64 {
    macro_rules! int {
        ($ty:ty, $uty:ty) => {{
            let (t, o, c) = (t as $uty as $ty, o as $uty as $ty, c as $uty as $ty);
            let new = match op {
                AtomicOp::Min => t.min(o),
                AtomicOp::Max => t.max(o),
                AtomicOp::Sum => t.wrapping_add(o),
                AtomicOp::Bor => t | o,
                AtomicOp::Band => t & o,
                AtomicOp::Bxor => t ^ o,
                AtomicOp::Read => t,
                AtomicOp::Write => o,
                AtomicOp::Cswap => {
                    if t == c {
                        o
                    } else {
                        t
                    }
                }
            };
            new as $uty as u64
        }};
    }
    macro_rules! float {
        ($ty:ty, $uty:ty) => {{
            let (t, o, c) = (
                <$ty>::from_bits(t as $uty),
                <$ty>::from_bits(o as $uty),
                <$ty>::from_bits(c as $uty),
            );
            let new = match op {
                AtomicOp::Min => t.min(o),
                AtomicOp::Max => t.max(o),
                AtomicOp::Sum => t + o,
                AtomicOp::Write => o,
                AtomicOp::Cswap if t == c => o,
                _ => t,
            };
            new.to_bits() as u64
        }};
    }
    match dt {
        Datatype::U32 => int!(u32, u32),
        Datatype::I32 => int!(i32, u32),
        Datatype::U64 => int!(u64, u64),
        Datatype::I64 => int!(i64, u64),
        Datatype::F32 => float!(f32, u32),
        Datatype::F64 => float!(f64, u64),
    }
}

fn bits(b: &[u8]) -> u64 {
    match b.len() {
        4 => u32::from_ne_bytes(b.try_into().expect("4 bytes")) as u64,
        _ => u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    }
}

/// Serializes the elements [`execute_cpu`] cannot apply with one atomic instruction
/// (not naturally aligned): atomic with respect to each other only.
static UNALIGNED: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Applies `op` on `dt` to the elements at `target` (host memory) with the CPU's
/// atomic instructions and returns the old values (host order). `operand` and
/// `compare` (empty unless `Cswap`) hold the elements in host order.
///
/// Each naturally aligned element is updated by a compare-exchange loop on an
/// `AtomicU32`/`AtomicU64` (sequentially consistent), so it is atomic against every
/// other atomic instruction on that word: other calls of this function from any
/// thread, a provider's responder, the application's own atomics. An element that is
/// not naturally aligned is updated under one process-wide lock: atomic with respect to
/// other unaligned updates only (native providers refuse unaligned atomics, so no
/// native path can touch such a word).
///
/// # Safety
/// `target` must be valid for reads and writes of `operand.len()` bytes for the
/// duration of the call (e.g. inside a live registered region), and only accessed
/// concurrently through atomic instructions or this function.
pub unsafe fn execute_cpu(
    target: *mut u8,
    op: AtomicOp,
    dt: Datatype,
    operand: &[u8],
    compare: &[u8],
) -> Vec<u8> {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    let size = dt.size();
    let mut old = Vec::with_capacity(operand.len());
    for (i, o) in operand.chunks_exact(size).enumerate() {
        let o = bits(o);
        let c = if compare.len() == operand.len() {
            bits(&compare[i * size..(i + 1) * size])
        } else {
            0
        };
        let p = target.add(i * size);
        let prev = if (p as usize).is_multiple_of(size) {
            if size == 4 {
                // SAFETY: aligned, valid for 4 bytes (caller's contract).
                let a = &*(p as *const AtomicU32);
                let r = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                    Some(combine(op, dt, t as u64, o, c) as u32)
                });
                r.unwrap_or_else(|v| v) as u64
            } else {
                // SAFETY: aligned, valid for 8 bytes (caller's contract).
                let a = &*(p as *const AtomicU64);
                let r = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                    Some(combine(op, dt, t, o, c))
                });
                r.unwrap_or_else(|v| v)
            }
        } else {
            let _g = UNALIGNED.lock();
            let mut buf = [0u8; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), size);
            let t = bits(&buf[..size]);
            let new = combine(op, dt, t, o, c);
            if size == 4 {
                std::ptr::copy_nonoverlapping((new as u32).to_ne_bytes().as_ptr(), p, 4);
            } else {
                std::ptr::copy_nonoverlapping(new.to_ne_bytes().as_ptr(), p, 8);
            }
            t
        };
        if size == 4 {
            old.extend_from_slice(&(prev as u32).to_ne_bytes());
        } else {
            old.extend_from_slice(&prev.to_ne_bytes());
        }
    }
    old
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: AtomicOp, dt: Datatype, t: &mut [u8], o: &[u8], c: &[u8]) -> Vec<u8> {
        // An aligned copy, then the unaligned path on a shifted copy: both agree.
        let mut shifted = vec![0u8; t.len() + 1];
        shifted[1..].copy_from_slice(t);
        let mut aligned = vec![0u64; t.len().div_ceil(8)];
        let ap = aligned.as_mut_ptr() as *mut u8;
        unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), ap, t.len()) };
        let old = unsafe { execute_cpu(ap, op, dt, o, c) };
        let old2 = unsafe { execute_cpu(shifted.as_mut_ptr().add(1), op, dt, o, c) };
        assert_eq!(old, old2);
        let mut got = vec![0u8; t.len()];
        unsafe { std::ptr::copy_nonoverlapping(ap, got.as_mut_ptr(), t.len()) };
        assert_eq!(got, shifted[1..]);
        t.copy_from_slice(&got);
        old
    }

    #[test]
    fn arithmetic_per_type() {
        let mut t = 5u64.to_ne_bytes();
        let old = run(
            AtomicOp::Sum,
            Datatype::U64,
            &mut t,
            &3u64.to_ne_bytes(),
            &[],
        );
        assert_eq!(old, 5u64.to_ne_bytes());
        assert_eq!(u64::from_ne_bytes(t), 8);
        let mut t = (-4i32).to_ne_bytes();
        run(
            AtomicOp::Min,
            Datatype::I32,
            &mut t,
            &(-9i32).to_ne_bytes(),
            &[],
        );
        assert_eq!(i32::from_ne_bytes(t), -9);
        let mut t = 7u32.to_ne_bytes();
        run(
            AtomicOp::Cswap,
            Datatype::U32,
            &mut t,
            &1u32.to_ne_bytes(),
            &6u32.to_ne_bytes(),
        );
        assert_eq!(u32::from_ne_bytes(t), 7);
        run(
            AtomicOp::Cswap,
            Datatype::U32,
            &mut t,
            &1u32.to_ne_bytes(),
            &7u32.to_ne_bytes(),
        );
        assert_eq!(u32::from_ne_bytes(t), 1);
        let mut t = 1.5f64.to_ne_bytes();
        run(
            AtomicOp::Sum,
            Datatype::F64,
            &mut t,
            &2.25f64.to_ne_bytes(),
            &[],
        );
        assert_eq!(f64::from_ne_bytes(t), 3.75);
        let mut t = [1u32.to_ne_bytes(), 2u32.to_ne_bytes()].concat();
        let o = [4u32.to_ne_bytes(), 8u32.to_ne_bytes()].concat();
        let old = run(AtomicOp::Bor, Datatype::U32, &mut t, &o, &[]);
        assert_eq!(old, [1u32.to_ne_bytes(), 2u32.to_ne_bytes()].concat());
        assert_eq!(t, [5u32.to_ne_bytes(), 10u32.to_ne_bytes()].concat());
        assert!(!AtomicForm::Plain.allows(AtomicOp::Read));
        assert!(!AtomicForm::Fetch.allows(AtomicOp::Cswap));
        assert!(AtomicForm::Compare.allows(AtomicOp::Cswap));
        for c in 0..20 {
            if let Some(op) = AtomicOp::from_code(c) {
                assert_eq!(op.code(), c);
            }
            if let Some(d) = Datatype::from_code(c) {
                assert_eq!(d.code(), c);
            }
        }
    }

    #[test]
    fn concurrent_fetch_add_is_exact() {
        let word = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = word.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let p = w.as_ptr() as *mut u8;
                        if i % 2 == 0 {
                            unsafe {
                                execute_cpu(
                                    p,
                                    AtomicOp::Sum,
                                    Datatype::U64,
                                    &1u64.to_ne_bytes(),
                                    &[],
                                )
                            };
                        } else {
                            // The other path: a plain CPU atomic on the same word.
                            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(word.load(std::sync::atomic::Ordering::SeqCst), 40_000);
    }
}
