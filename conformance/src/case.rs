//! What a conformance case is: a named check in a group, the capabilities it needs, and
//! the function that runs it, plus the error type cases return and the assertion
//! helpers they use.

use std::fmt;

use fabric::Caps;

use crate::ctx::Ctx;

/// The result of running one case: `Ok(())` passes.
pub type CaseResult = Result<(), CaseError>;

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseError {
    /// The provider did something wrong (or the case could not set itself up).
    Fail(String),
    /// The case does not apply to this provider (e.g. a limit makes it meaningless).
    Skip(String),
}

impl CaseError {
    /// A failure with a message.
    pub fn fail(msg: impl Into<String>) -> Self {
        CaseError::Fail(msg.into())
    }
    /// A skip with a reason.
    pub fn skip(msg: impl Into<String>) -> Self {
        CaseError::Skip(msg.into())
    }
    /// Prefixes the message with context.
    pub fn context(self, ctx: impl fmt::Display) -> Self {
        match self {
            CaseError::Fail(m) => CaseError::Fail(format!("{ctx}: {m}")),
            CaseError::Skip(m) => CaseError::Skip(format!("{ctx}: {m}")),
        }
    }
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Fail(m) => write!(f, "{m}"),
            CaseError::Skip(m) => write!(f, "skipped: {m}"),
        }
    }
}

impl From<String> for CaseError {
    fn from(s: String) -> Self {
        CaseError::Fail(s)
    }
}

impl From<&str> for CaseError {
    fn from(s: &str) -> Self {
        CaseError::Fail(s.to_string())
    }
}

impl From<fabric::Error> for CaseError {
    fn from(e: fabric::Error) -> Self {
        CaseError::Fail(e.to_string())
    }
}

impl From<fabric::GetInfoError> for CaseError {
    fn from(e: fabric::GetInfoError) -> Self {
        CaseError::Fail(e.to_string())
    }
}

/// Adds context to any `Result` whose error displays, turning it into a [`CaseError`]:
/// `ep.send(..).ctx("client send")?`.
pub trait Check<T> {
    /// Maps the error to a failure that says what was being done.
    fn ctx(self, what: impl fmt::Display) -> Result<T, CaseError>;
}

impl<T, E: fmt::Display> Check<T> for Result<T, E> {
    fn ctx(self, what: impl fmt::Display) -> Result<T, CaseError> {
        self.map_err(|e| CaseError::Fail(format!("{what}: {e}")))
    }
}

/// One conformance check.
#[derive(Clone, Copy)]
pub struct Case {
    /// Group (`getinfo`, `mr`, `cq`, `eq`, `msg`, `rma`, `errors`, ...).
    pub group: &'static str,
    /// Name, unique inside the group.
    pub name: &'static str,
    /// One line saying what the case checks.
    pub about: &'static str,
    /// Capabilities the provider must offer (for a connected `EpType::Msg` endpoint);
    /// if its getinfo does not offer them the case is skipped with the provider's reason.
    pub needs: Caps,
    /// The check.
    pub run: fn(&Ctx) -> CaseResult,
}

impl Case {
    /// `group/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("id", &self.id())
            .field("needs", &self.needs)
            .finish()
    }
}

/// Fails the case with a formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::CaseError::Fail(format!($($arg)+)));
        }
    };
}

/// Fails the case unless two values are equal; the message says what was compared and
/// shows both values.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (l, r) => {
                if *l != *r {
                    return Err($crate::CaseError::Fail(format!(
                        "{}: expected {:?}, got {:?}",
                        format!($($arg)+),
                        r,
                        l
                    )));
                }
            }
        }
    };
}

/// Fails unless `result` is an error of kind `kind`; `what` names the operation.
pub fn expect_err<T: fmt::Debug>(
    result: fabric::Result<T>,
    kind: fabric::ErrorKind,
    what: &str,
) -> CaseResult {
    match result {
        Ok(v) => Err(CaseError::fail(format!(
            "{what}: expected error {kind:?}, but it succeeded ({v:?})"
        ))),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(CaseError::fail(format!(
            "{what}: expected error {kind:?}, got {:?} ({e})",
            e.kind()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq_fails() -> CaseResult {
        ensure_eq!(1 + 1, 3, "sum");
        Ok(())
    }

    fn ensure_passes() -> CaseResult {
        ensure!(2 > 1, "never");
        Ok(())
    }

    #[test]
    fn ensure_eq_reports_both_values() {
        let e = eq_fails().unwrap_err();
        assert_eq!(e, CaseError::fail("sum: expected 3, got 2"));
        assert!(ensure_passes().is_ok());
    }

    #[test]
    fn expect_err_checks_kind() {
        let r: fabric::Result<()> = Err(fabric::Error::invalid("x"));
        assert!(expect_err(r.clone(), fabric::ErrorKind::InvalidArgument, "op").is_ok());
        let msg = expect_err(r, fabric::ErrorKind::AccessDenied, "op").unwrap_err();
        assert!(msg.to_string().contains("AccessDenied"), "{msg}");
        let ok: fabric::Result<u8> = Ok(1);
        assert!(expect_err(ok, fabric::ErrorKind::AccessDenied, "op").is_err());
    }
}
