//! Atomic operations (libfabric `fi_atomic`): the operations and datatypes the layer
//! executes, the `atomicvalid` query, and the arithmetic the target applies.
//!
//! The operation and datatype enums are fabric-core's ([`fabric_core::atomic`]), shared
//! with the MSG endpoints' atomic class.
//!
//! Two paths. **Native**: when the MSG endpoint of the connection to the target
//! executes the (operation, datatype, form) natively for the call's element count
//! (its `fetch_atomicvalid` & co.; softroce: u64/i64 fetch-add and compare-swap, one
//! element) and coherently with CPU atomics (`Endpoint::atomic_cpu_coherent`:
//! softroce yes, verbs only on `IBV_ATOMIC_GLOB` devices, not kernel rxe's `HCA`),
//! the layer posts it on that endpoint, as an RMA (the provider's target
//! executes it; no software at the target's layer). **Emulated**: everything else is
//! a request message that the target's layer executes on a region bound with
//! `bind_mr`, one element at a time with the CPU's atomic instructions
//! ([`fabric_core::atomic::execute_cpu`]: a compare-exchange loop per naturally
//! aligned element).
//!
//! Atomicity across the two paths on one target word holds because both end in CPU
//! atomic instructions on that word: softroce's responder applies RC atomics with a
//! compare-exchange on the registered memory, and the emulated path does the same, so
//! a native fetch-add and an emulated one on the same u64 never lose an update.
//! Native RC atomics need an 8-byte aligned address; an emulated element that is not
//! naturally aligned is updated under a process-wide lock (atomic with respect to
//! other emulated updates only; no native path can touch it).
//!
//! Operands and results of the layer's calls are little-endian (the native path is
//! used on little-endian hosts only, where that is the host order native providers
//! use).

pub use fabric_core::atomic::{AtomicForm, AtomicOp, Datatype};

/// Most elements in one atomic call (operands and results travel in one message).
pub const MAX_ATOMIC_COUNT: usize = 256;

/// libfabric's `fi_atomicvalid` / `fi_fetch_atomicvalid` / `fi_compare_atomicvalid`:
/// the most elements one call of `form` may carry for `op` on `dt`, or `None` when the
/// combination is not supported. Bitwise operations are integer-only; floats support
/// sum, min, max, read and write (swap).
pub fn atomic_valid(op: AtomicOp, dt: Datatype, form: AtomicForm) -> Option<usize> {
    let float = matches!(dt, Datatype::F32 | Datatype::F64);
    let ok = match (form, op) {
        (AtomicForm::Compare, AtomicOp::Cswap) => !float,
        (AtomicForm::Compare, _) | (_, AtomicOp::Cswap) => false,
        (AtomicForm::Plain, AtomicOp::Read) => false,
        (_, AtomicOp::Bor | AtomicOp::Band | AtomicOp::Bxor) => !float,
        _ => true,
    };
    ok.then_some(MAX_ATOMIC_COUNT)
}

/// Applies `op` to `count` elements at `target` (inside a live registered region),
/// with the operands little-endian as they travel; returns the old values,
/// little-endian. Each element is updated with the CPU's atomic instructions
/// ([`fabric_core::atomic::execute_cpu`]). The caller has checked the combination
/// with [`atomic_valid`] and the lengths.
///
/// # Safety
/// `target` must be valid for `operand.len()` bytes inside a live registered region,
/// accessed concurrently only through atomic instructions or this function.
pub(crate) unsafe fn execute(
    op: AtomicOp,
    dt: Datatype,
    target: *mut u8,
    operand: &[u8],
    compare: &[u8],
) -> Vec<u8> {
    let s = dt.size();
    let swap = |b: &[u8]| -> Vec<u8> {
        // Little-endian to host order and back are the same byte swap (none on
        // little-endian hosts).
        if cfg!(target_endian = "little") {
            b.to_vec()
        } else {
            b.chunks_exact(s)
                .flat_map(|e| e.iter().rev().copied())
                .collect()
        }
    };
    let (o, c) = (swap(operand), swap(compare));
    // SAFETY: the caller's contract.
    let old = unsafe { fabric_core::atomic::execute_cpu(target, op, dt, &o, &c) };
    swap(&old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_valid() {
        let mut t = 5u64.to_ne_bytes();
        let old = unsafe {
            execute(
                AtomicOp::Sum,
                Datatype::U64,
                t.as_mut_ptr(),
                &3u64.to_le_bytes(),
                &[],
            )
        };
        assert_eq!(old, 5u64.to_le_bytes());
        assert_eq!(u64::from_ne_bytes(t), 8);
        let mut t = 7u32.to_ne_bytes();
        unsafe {
            execute(
                AtomicOp::Cswap,
                Datatype::U32,
                t.as_mut_ptr(),
                &1u32.to_le_bytes(),
                &7u32.to_le_bytes(),
            )
        };
        assert_eq!(u32::from_ne_bytes(t), 1);
        assert!(atomic_valid(AtomicOp::Bxor, Datatype::F32, AtomicForm::Plain).is_none());
        assert!(atomic_valid(AtomicOp::Cswap, Datatype::U64, AtomicForm::Compare).is_some());
        assert!(atomic_valid(AtomicOp::Cswap, Datatype::U64, AtomicForm::Fetch).is_none());
        assert!(atomic_valid(AtomicOp::Read, Datatype::U64, AtomicForm::Plain).is_none());
    }
}
