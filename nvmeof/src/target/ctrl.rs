//! Controllers: properties, features, keep-alive, error log and health counters
//! (nvmet's core.c controller half).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::subsys::{Subsystem, MAX_NSID};
use crate::transport::CQE_LEN;
use crate::wire::identify::{oncs, sgls, vwc, ControllerType, IdentifyController};
use crate::wire::log::{ErrorInformationEntry, SmartLog, TransportType};
use crate::wire::properties::{Cap, Cc, Csts, Vs};
use crate::wire::text::{Ascii, Nqn};

/// Queue entries a controller supports (CAP.MQES + 1).
pub const MAX_QUEUE_DEPTH: u16 = 128;
/// I/O queues a controller grants at most.
pub const MAX_IO_QUEUES: u16 = 16;
/// MDTS as a power of two of 4 KiB pages: 2^5 * 4 KiB = 128 KiB per command.
pub const MDTS: u8 = 5;
/// Bytes one command may move.
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// Keep-alive granularity (KAS) in 100 ms units.
const KAS: u16 = 1;
/// Error log entries kept (ELPE + 1).
const ERROR_LOG_ENTRIES: usize = 64;
/// Keep-alive timeout a discovery controller gets when the host asks for none.
const DISCOVERY_KATO_MS: u32 = 120_000;

/// State changed by commands.
#[derive(Debug)]
pub(crate) struct CtrlState {
    pub(crate) cc: Cc,
    pub(crate) csts: Csts,
    pub(crate) kato_ms: u32,
    pub(crate) last_keep_alive: Instant,
    pub(crate) io_queues: u16,
    pub(crate) wce: bool,
    pub(crate) aec: u32,
    pub(crate) held_aers: Vec<u16>,
    pub(crate) errors: VecDeque<ErrorInformationEntry>,
    pub(crate) error_count: u64,
    pub(crate) smart: SmartLog,
    /// Bytes read and written, for SMART data units (1000 x 512 bytes each).
    pub(crate) bytes_read: u128,
    pub(crate) bytes_written: u128,
}

/// One controller of a subsystem, shared by its queues.
#[derive(Debug)]
pub(crate) struct Controller {
    pub(crate) cntlid: u16,
    pub(crate) subsys: Arc<Subsystem>,
    pub(crate) hostnqn: String,
    pub(crate) hostid: [u8; 16],
    pub(crate) inline_data: usize,
    state: Mutex<CtrlState>,
    dead: AtomicBool,
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        inline_data: usize,
    ) -> Controller {
        let kato_ms = if subsys.discovery && kato_ms == 0 {
            DISCOVERY_KATO_MS
        } else {
            round_kato(kato_ms)
        };
        Controller {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            inline_data,
            state: Mutex::new(CtrlState {
                cc: Cc(0),
                csts: Csts(0),
                kato_ms,
                last_keep_alive: Instant::now(),
                io_queues: MAX_IO_QUEUES,
                wce: true,
                aec: 0,
                held_aers: Vec::new(),
                errors: VecDeque::new(),
                error_count: 0,
                smart: SmartLog::default(),
                bytes_read: 0,
                bytes_written: 0,
            }),
            dead: AtomicBool::new(false),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, CtrlState> {
        // A panic while holding the lock is a bug elsewhere; keep serving the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Tears the controller down: every queue thread sees it and disconnects.
    pub(crate) fn kill(&self, why: &str) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::info!(cntlid = self.cntlid, subnqn = %self.subsys.nqn, "controller torn down: {why}");
            let mut s = self.state();
            s.csts = s.csts.with_cfs(true).with_rdy(false);
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.state().csts.rdy()
    }

    /// Whether the keep-alive timer expired.
    pub(crate) fn keep_alive_expired(&self) -> bool {
        let s = self.state();
        s.kato_ms != 0 && s.last_keep_alive.elapsed() > Duration::from_millis(s.kato_ms.into())
    }

    pub(crate) fn keep_alive(&self) {
        self.state().last_keep_alive = Instant::now();
    }

    /// CAP: MQES, CQR, timeout 7.5 s (TO 15), NVM command set, 4 KiB pages.
    pub(crate) fn cap(&self) -> Cap {
        Cap(0)
            .with_mqes(MAX_QUEUE_DEPTH - 1)
            .with_cqr(true)
            .with_to(15)
            .with_css(1)
            .with_mpsmin(0)
            .with_mpsmax(0)
    }

    pub(crate) fn vs() -> Vs {
        Vs::new(1, 4, 0)
    }

    /// A write of CC: enable sets RDY, disable clears it, a shutdown notification
    /// completes at once (SHST = 2).
    pub(crate) fn set_cc(&self, value: u32) {
        let mut s = self.state();
        let new = Cc(value);
        let old = s.cc;
        s.cc = new;
        if new.en() && !old.en() {
            let ok = new.iosqes() == 6 && new.iocqes() == 4 && new.mps() == 0 && new.css() == 0;
            s.csts = if ok {
                s.csts.with_rdy(true)
            } else {
                s.csts.with_cfs(true)
            };
        } else if !new.en() && old.en() {
            s.csts = s.csts.with_rdy(false).with_shst(0);
        }
        if new.shn() != 0 && old.shn() == 0 {
            s.csts = s.csts.with_shst(2);
        } else if new.shn() == 0 {
            s.csts = s.csts.with_shst(0);
        }
    }

    /// Adds an error information log entry.
    pub(crate) fn log_error(&self, mut entry: ErrorInformationEntry) {
        let mut s = self.state();
        s.error_count += 1;
        entry.error_count = s.error_count;
        entry.trtype = TransportType::Rdma;
        s.errors.push_front(entry);
        s.errors.truncate(ERROR_LOG_ENTRIES);
    }

    pub(crate) fn count_io(&self, read: u64, written: u64) {
        let mut s = self.state();
        if read > 0 {
            s.bytes_read += u128::from(read);
            s.smart.host_reads += 1;
        }
        if written > 0 {
            s.bytes_written += u128::from(written);
            s.smart.host_writes += 1;
        }
    }

    pub(crate) fn smart_log(&self) -> SmartLog {
        let s = self.state();
        let mut log = s.smart.clone();
        // Thousands of 512-byte units, rounded up.
        log.data_units_read = (s.bytes_read / 512).div_ceil(1000);
        log.data_units_written = (s.bytes_written / 512).div_ceil(1000);
        log.temperature = 273 + 30;
        log.avail_spare = 100;
        log.spare_thresh = 10;
        log.num_err_log_entries = u128::from(s.error_count);
        log.power_cycles = 1;
        log
    }

    pub(crate) fn identify(&self) -> IdentifyController {
        let discovery = self.subsys.discovery;
        let ascii = |s: &str, n: usize| {
            let cut: String = s
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(n)
                .collect();
            cut
        };
        let mut id = IdentifyController {
            sn: Ascii::new(&ascii(&self.subsys.serial, 20)).unwrap_or_default(),
            mn: Ascii::new(&ascii(&self.subsys.model, 40)).unwrap_or_default(),
            fr: Ascii::new(env!("CARGO_PKG_VERSION")).unwrap_or_default(),
            rab: 6,
            mdts: MDTS,
            cntlid: self.cntlid,
            ver: Self::vs().0,
            cntrltype: if discovery {
                ControllerType::Discovery
            } else {
                ControllerType::Io
            },
            acl: 3,
            aerl: 3,
            lpa: 1 << 2,
            elpe: (ERROR_LOG_ENTRIES - 1) as u8,
            kas: KAS,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: MAX_QUEUE_DEPTH,
            sgls: sgls::SUPPORTED | sgls::KEYED | sgls::OFFSET,
            subnqn: Nqn::new(&self.subsys.nqn).unwrap_or_default(),
            ioccsz: IdentifyController::ioccsz_for_inline(self.inline_data as u32),
            iorcsz: (CQE_LEN / 16) as u32,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            ..Default::default()
        };
        if !discovery {
            id.nn = MAX_NSID;
            id.mnan = MAX_NSID;
            id.oaes = 1 << 8;
            id.oncs = oncs::COMPARE | oncs::DSM | oncs::WRITE_ZEROES | oncs::VERIFY | oncs::COPY;
            id.vwc = vwc::PRESENT | vwc::FLUSH_ALL_NSID;
            id.ieee = [0x00, 0x00, 0x00];
        }
        id
    }
}

/// KATO rounded up to KAS units (100 ms).
fn round_kato(ms: u32) -> u32 {
    let unit = u32::from(KAS) * 100;
    ms.div_ceil(unit).saturating_mul(unit)
}
