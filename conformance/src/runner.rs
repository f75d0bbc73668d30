//! Runs cases against one provider: selects them by pattern, skips those whose
//! capabilities the provider does not offer, runs each on its own thread with panics
//! caught and a time limit, and collects a [`Report`].

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::case::{Case, CaseError};
use crate::ctx::Ctx;

/// How long one case may run before it is reported as failed. Its thread cannot be
/// killed; it is left behind (and the provider's objects it holds with it).
pub const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Only cases whose `group/name` matches (see [`matches()`]).
    pub filter: Option<String>,
    /// Time limit per case.
    pub case_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            filter: None,
            case_timeout: DEFAULT_CASE_TIMEOUT,
        }
    }
}

/// What became of one case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum Outcome {
    /// It passed.
    Pass,
    /// It failed, with the reason.
    Fail(String),
    /// It did not apply, with the reason.
    Skip(String),
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Group.
    pub group: &'static str,
    /// Name.
    pub name: &'static str,
    /// Result.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Wall time in milliseconds.
    pub millis: u64,
}

impl fmt::Display for CaseReport {
    /// One line: `PASS  group/name  (12 ms)`, `FAIL  group/name: reason`,
    /// `SKIP  group/name: reason`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Pass => write!(
                f,
                "PASS  {}/{}  ({} ms)",
                self.group, self.name, self.millis
            ),
            Outcome::Fail(r) => write!(f, "FAIL  {}/{}: {}", self.group, self.name, r),
            Outcome::Skip(r) => write!(f, "SKIP  {}/{}: {}", self.group, self.name, r),
        }
    }
}

/// The results of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The provider under test.
    pub provider: String,
    /// One entry per selected case, in run order.
    pub cases: Vec<CaseReport>,
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases skipped.
    pub skipped: usize,
}

impl Report {
    fn new(provider: &str, cases: Vec<CaseReport>) -> Self {
        let count = |f: fn(&Outcome) -> bool| cases.iter().filter(|c| f(&c.outcome)).count();
        Report {
            provider: provider.to_string(),
            passed: count(|o| matches!(o, Outcome::Pass)),
            failed: count(|o| matches!(o, Outcome::Fail(_))),
            skipped: count(|o| matches!(o, Outcome::Skip(_))),
            cases,
        }
    }

    /// `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }

    /// The lines of the failed cases.
    pub fn failures(&self) -> Vec<String> {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
            .map(|c| c.to_string())
            .collect()
    }
}

/// The run could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// No provider of that name is registered; carries the registered names.
    UnknownProvider(String, Vec<String>),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::UnknownProvider(p, known) => write!(
                f,
                "no provider named '{p}' is compiled in (known: {})",
                known.join(", ")
            ),
        }
    }
}

impl std::error::Error for RunError {}

/// Whether `id` (`group/name`) is selected by `pattern`: a glob (`*` any run, `?` one
/// character) matched against the whole id when the pattern has `*` or `?`, else a
/// substring.
pub fn matches(pattern: &str, id: &str) -> bool {
    if pattern.contains(['*', '?']) {
        glob(pattern.as_bytes(), id.as_bytes())
    } else {
        id.contains(pattern)
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point (the last `*`).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The cases `filter` selects, in order.
pub fn select<'a>(cases: &'a [Case], filter: Option<&str>) -> Vec<&'a Case> {
    cases
        .iter()
        .filter(|c| filter.is_none_or(|f| matches(f, &c.id())))
        .collect()
}

/// Runs the selected cases against `ctx`'s provider, calling `on_result` as each one
/// finishes (for progress output).
pub fn run(
    ctx: &Ctx,
    cases: &[Case],
    opts: &RunOptions,
    mut on_result: impl FnMut(&CaseReport),
) -> Result<Report, RunError> {
    let known: Vec<String> = ctx
        .registry()
        .providers()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    if !known.iter().any(|n| n == ctx.provider()) {
        return Err(RunError::UnknownProvider(ctx.provider().to_string(), known));
    }
    let mut reports = Vec::new();
    for case in select(cases, opts.filter.as_deref()) {
        let start = Instant::now();
        let outcome = run_one(ctx, case, opts.case_timeout);
        let report = CaseReport {
            group: case.group,
            name: case.name,
            outcome,
            millis: start.elapsed().as_millis() as u64,
        };
        on_result(&report);
        reports.push(report);
    }
    Ok(Report::new(ctx.provider(), reports))
}

/// Runs one case: skip check, then the case on its own thread with a time limit.
pub fn run_one(ctx: &Ctx, case: &Case, timeout: Duration) -> Outcome {
    if let Some(why) = ctx.rejection(&ctx.hints(case.needs)) {
        return Outcome::Skip(format!(
            "provider does not offer {}: {why}",
            fabric::info::flag_names(case.needs)
        ));
    }
    let (tx, rx) = mpsc::channel();
    let thread_ctx = ctx.clone();
    let run = case.run;
    let spawned = std::thread::Builder::new().name(case.id()).spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(|| run(&thread_ctx)));
        // The receiver may have given up (timeout); nothing to do then.
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        return Outcome::Fail(format!("cannot spawn the case's thread: {e}"));
    }
    match rx.recv_timeout(timeout) {
        Ok(Ok(Ok(()))) => Outcome::Pass,
        Ok(Ok(Err(CaseError::Fail(m)))) => Outcome::Fail(m),
        Ok(Ok(Err(CaseError::Skip(m)))) => Outcome::Skip(m),
        Ok(Err(panic)) => Outcome::Fail(format!("panicked: {}", panic_message(&*panic))),
        Err(mpsc::RecvTimeoutError::Timeout) => Outcome::Fail(format!(
            "timed out after {} s (case thread left running)",
            timeout.as_secs_f64()
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Outcome::Fail("the case's thread ended without a result".to_string())
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::CaseResult;
    use fabric::provider::FabricOps;
    use fabric::{Caps, EpType, Info, Limits, Provider, Registry};
    use std::sync::Arc;

    /// Offers MSG | RMA only, and opens nothing: enough for the skip path.
    struct FakeProvider;

    impl Provider for FakeProvider {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn offers(&self) -> Vec<Info> {
            let mut limits = Limits::DEFAULT;
            limits.max_msg_size = 1 << 20;
            limits.inject_size = 64;
            limits.mr_key_size = 8;
            limits.cq_data_size = 8;
            limits.tx_size = 64;
            limits.rx_size = 64;
            limits.iov_limit = 4;
            limits.rma_iov_limit = 4;
            limits.cm_data_size = 64;
            limits.mtu = 0;
            vec![Info::new(
                "fake",
                Caps::MSG | Caps::RMA,
                EpType::Msg,
                limits,
            )]
        }
        fn open_fabric(&self, _info: &Info) -> fabric::Result<Arc<dyn FabricOps>> {
            Err(fabric::Error::unsupported("fake provider"))
        }
    }

    fn ctx() -> Ctx {
        Ctx::new("fake", Registry::new().with(Arc::new(FakeProvider)))
    }

    fn passes(ctx: &Ctx) -> CaseResult {
        crate::ensure_eq!(ctx.provider(), "fake", "provider name");
        Ok(())
    }
    fn fails(_: &Ctx) -> CaseResult {
        Err(CaseError::fail("wrong answer"))
    }
    fn skips(_: &Ctx) -> CaseResult {
        Err(CaseError::skip("limit too small"))
    }
    fn panics(_: &Ctx) -> CaseResult {
        panic!("boom {}", 42)
    }
    fn hangs(_: &Ctx) -> CaseResult {
        std::thread::sleep(Duration::from_secs(30));
        Ok(())
    }
    fn must_not_run(_: &Ctx) -> CaseResult {
        panic!("a case whose capabilities are missing must not run")
    }

    const fn case(
        group: &'static str,
        name: &'static str,
        needs: Caps,
        run: fn(&Ctx) -> CaseResult,
    ) -> Case {
        Case {
            group,
            name,
            about: "runner test",
            needs,
            run,
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            case("a", "passes", Caps::MSG, passes),
            case("a", "fails", Caps::MSG, fails),
            case("a", "skips", Caps::empty(), skips),
            case("b", "panics", Caps::MSG, panics),
            case("b", "needs_pmem", Caps::RMA_PMEM, must_not_run),
            case("c", "hangs", Caps::MSG, hangs),
        ]
    }

    fn outcome<'a>(r: &'a Report, name: &str) -> &'a Outcome {
        &r.cases.iter().find(|c| c.name == name).unwrap().outcome
    }

    #[test]
    fn outcomes_cover_pass_fail_skip_panic_and_timeout() {
        // Generous enough for a panic to print its backtrace (RUST_BACKTRACE=1) on a
        // loaded machine; the hanging case sleeps far longer.
        let opts = RunOptions {
            filter: None,
            case_timeout: Duration::from_secs(5),
        };
        let mut lines = Vec::new();
        let r = run(&ctx(), &cases(), &opts, |c| lines.push(c.to_string())).unwrap();
        assert_eq!(lines.len(), 6);
        assert_eq!(outcome(&r, "passes"), &Outcome::Pass);
        assert_eq!(outcome(&r, "fails"), &Outcome::Fail("wrong answer".into()));
        assert_eq!(
            outcome(&r, "skips"),
            &Outcome::Skip("limit too small".into())
        );
        match outcome(&r, "panics") {
            Outcome::Fail(m) => assert!(m.contains("panicked: boom 42"), "{m}"),
            o => panic!("panic not captured: {o:?}"),
        }
        match outcome(&r, "needs_pmem") {
            Outcome::Skip(m) => assert!(m.contains("RMA_PMEM"), "skip reason: {m}"),
            o => panic!("missing capability not skipped: {o:?}"),
        }
        match outcome(&r, "hangs") {
            Outcome::Fail(m) => assert!(m.contains("timed out"), "{m}"),
            o => panic!("timeout not caught: {o:?}"),
        }
        assert_eq!(r.summary(), "1 passed, 3 failed, 2 skipped");
        assert_eq!(r.failures().len(), 3);
        assert!(lines[0].starts_with("PASS  a/passes  ("), "{}", lines[0]);
        assert_eq!(lines[1], "FAIL  a/fails: wrong answer");
        assert_eq!(lines[2], "SKIP  a/skips: limit too small");
    }

    #[test]
    fn filter_selects_by_substring_and_glob() {
        let cs = cases();
        let ids =
            |f: &str| -> Vec<String> { select(&cs, Some(f)).iter().map(|c| c.id()).collect() };
        assert_eq!(ids("pass"), vec!["a/passes"]);
        assert_eq!(ids("b/"), vec!["b/panics", "b/needs_pmem"]);
        assert_eq!(ids("a/*"), vec!["a/passes", "a/fails", "a/skips"]);
        assert_eq!(
            ids("*s"),
            vec!["a/passes", "a/fails", "a/skips", "b/panics", "c/hangs"]
        );
        assert_eq!(ids("?/fail?"), vec!["a/fails"]);
        assert!(ids("nothing").is_empty());
        assert_eq!(select(&cs, None).len(), cs.len());
        let opts = RunOptions {
            filter: Some("a/pass*".into()),
            ..RunOptions::default()
        };
        let r = run(&ctx(), &cs, &opts, |_| {}).unwrap();
        assert_eq!((r.passed, r.failed, r.skipped), (1, 0, 0));
    }

    #[test]
    fn unknown_provider_is_an_error() {
        let c = Ctx::new("nope", Registry::new().with(Arc::new(FakeProvider)));
        let e = run(&c, &cases(), &RunOptions::default(), |_| {}).unwrap_err();
        assert!(e.to_string().contains("known: fake"), "{e}");
    }

    #[test]
    fn json_report_names_status_and_reason() {
        let opts = RunOptions {
            filter: Some("a/".into()),
            ..RunOptions::default()
        };
        let r = run(&ctx(), &cases(), &opts, |_| {}).unwrap();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["provider"], "fake");
        assert_eq!(v["passed"], 1);
        assert_eq!(v["cases"][1]["status"], "fail");
        assert_eq!(v["cases"][1]["reason"], "wrong answer");
        assert_eq!(v["cases"][0]["name"], "passes");
    }
}
