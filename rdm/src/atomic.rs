//! Atomic operations (libfabric `fi_atomic`): the operations and datatypes the layer
//! executes, the `atomicvalid` query, and the arithmetic the target applies.
//!
//! Operands travel little-endian; the target applies the operation to its memory in
//! the host's byte order, one element at a time, under the endpoint's lock, so atomics
//! from any number of initiators to one target are atomic with respect to each other
//! (not to the target's own CPU stores, as for any emulated atomic).

/// An atomic operation.
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

/// An element type.
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
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Datatype::U32 | Datatype::I32 | Datatype::F32 => 4,
            Datatype::U64 | Datatype::I64 | Datatype::F64 => 8,
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(c: u8) -> Option<Datatype> {
        [
            Datatype::U32,
            Datatype::U64,
            Datatype::I32,
            Datatype::I64,
            Datatype::F32,
            Datatype::F64,
        ]
        .into_iter()
        .find(|d| d.code() == c)
    }
}

impl AtomicOp {
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(c: u8) -> Option<AtomicOp> {
        use AtomicOp::*;
        [Min, Max, Sum, Bor, Band, Bxor, Read, Write, Cswap]
            .into_iter()
            .find(|o| o.code() == c)
    }
}

/// Which form of atomic call an operation is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicForm {
    /// `atomic` (no result).
    Plain,
    /// `fetch_atomic` (the old value comes back).
    Fetch,
    /// `compare_atomic`.
    Compare,
}

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

macro_rules! apply_int {
    ($t:ty, $op:expr, $tgt:expr, $o:expr, $c:expr) => {{
        let n = std::mem::size_of::<$t>();
        let t = <$t>::from_ne_bytes($tgt[..n].try_into().expect("element size"));
        let o = <$t>::from_le_bytes($o[..n].try_into().expect("element size"));
        let c = <$t>::from_le_bytes($c[..n].try_into().expect("element size"));
        let new = match $op {
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
        $tgt[..n].copy_from_slice(&new.to_ne_bytes());
        t.to_le_bytes().to_vec()
    }};
}

macro_rules! apply_float {
    ($t:ty, $op:expr, $tgt:expr, $o:expr) => {{
        let n = std::mem::size_of::<$t>();
        let t = <$t>::from_ne_bytes($tgt[..n].try_into().expect("element size"));
        let o = <$t>::from_le_bytes($o[..n].try_into().expect("element size"));
        let new = match $op {
            AtomicOp::Min => t.min(o),
            AtomicOp::Max => t.max(o),
            AtomicOp::Sum => t + o,
            AtomicOp::Write => o,
            _ => t,
        };
        $tgt[..n].copy_from_slice(&new.to_ne_bytes());
        t.to_le_bytes().to_vec()
    }};
}

/// Applies `op` to one element: `target` in host order (updated in place), `operand`
/// and `compare` little-endian; returns the old value, little-endian. The caller has
/// checked the combination with [`atomic_valid`] and the slice lengths.
pub(crate) fn apply(
    op: AtomicOp,
    dt: Datatype,
    target: &mut [u8],
    operand: &[u8],
    compare: &[u8],
) -> Vec<u8> {
    match dt {
        Datatype::U32 => apply_int!(u32, op, target, operand, compare),
        Datatype::U64 => apply_int!(u64, op, target, operand, compare),
        Datatype::I32 => apply_int!(i32, op, target, operand, compare),
        Datatype::I64 => apply_int!(i64, op, target, operand, compare),
        Datatype::F32 => apply_float!(f32, op, target, operand),
        Datatype::F64 => apply_float!(f64, op, target, operand),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_per_type() {
        let mut t = 5u64.to_ne_bytes();
        let old = apply(
            AtomicOp::Sum,
            Datatype::U64,
            &mut t,
            &3u64.to_le_bytes(),
            &[0; 8],
        );
        assert_eq!(old, 5u64.to_le_bytes());
        assert_eq!(u64::from_ne_bytes(t), 8);
        let mut t = (-4i32).to_ne_bytes();
        apply(
            AtomicOp::Min,
            Datatype::I32,
            &mut t,
            &(-9i32).to_le_bytes(),
            &[0; 4],
        );
        assert_eq!(i32::from_ne_bytes(t), -9);
        let mut t = 7u32.to_ne_bytes();
        apply(
            AtomicOp::Cswap,
            Datatype::U32,
            &mut t,
            &1u32.to_le_bytes(),
            &6u32.to_le_bytes(),
        );
        assert_eq!(u32::from_ne_bytes(t), 7);
        apply(
            AtomicOp::Cswap,
            Datatype::U32,
            &mut t,
            &1u32.to_le_bytes(),
            &7u32.to_le_bytes(),
        );
        assert_eq!(u32::from_ne_bytes(t), 1);
        let mut t = 1.5f64.to_ne_bytes();
        apply(
            AtomicOp::Sum,
            Datatype::F64,
            &mut t,
            &2.25f64.to_le_bytes(),
            &[0; 8],
        );
        assert_eq!(f64::from_ne_bytes(t), 3.75);
        assert!(atomic_valid(AtomicOp::Bxor, Datatype::F32, AtomicForm::Plain).is_none());
        assert!(atomic_valid(AtomicOp::Cswap, Datatype::U64, AtomicForm::Compare).is_some());
        assert!(atomic_valid(AtomicOp::Cswap, Datatype::U64, AtomicForm::Fetch).is_none());
        assert!(atomic_valid(AtomicOp::Read, Datatype::U64, AtomicForm::Plain).is_none());
        for c in 0..20 {
            if let Some(op) = AtomicOp::from_code(c) {
                assert_eq!(op.code(), c);
            }
            if let Some(d) = Datatype::from_code(c) {
                assert_eq!(d.code(), c);
            }
        }
    }
}
