//! Every modelled field of the fixed-size structures, at the offset and size that
//! libnvme's `src/nvme/types.h` gives (linux-nvme/libnvme, checked with `offsetof` /
//! `sizeof` by a C program compiled against that header): Identify Controller and
//! Namespace, the error information entry, the SMART / health log, the discovery log
//! entry, Connect data, Dataset Management ranges and Copy source ranges.
//!
//! All offsets already agreed when this was written; the table pins them.

use nvmeof::wire::fabrics::ConnectData;
use nvmeof::wire::identify::{IdentifyController, IdentifyNamespace};
use nvmeof::wire::log::{DiscoveryLogEntry, ErrorInformationEntry, SmartLog};
use nvmeof::wire::opcodes::{CopySourceRange, DsmRange};
use nvmeof::wire::FixedLayout;

fn check<T: FixedLayout>(expected: &[(&str, usize, usize)]) {
    for (name, offset, size) in expected {
        let f = T::FIELDS
            .iter()
            .find(|f| f.name == *name)
            .unwrap_or_else(|| panic!("{}: no field {name}", std::any::type_name::<T>()));
        assert_eq!(
            (f.offset, f.size),
            (*offset, *size),
            "{}.{name}",
            std::any::type_name::<T>()
        );
    }
    assert_eq!(
        T::FIELDS.len(),
        expected.len(),
        "{}",
        std::any::type_name::<T>()
    );
}

#[test]
fn offsets_match_libnvme() {
    check::<IdentifyController>(&[
        ("vid", 0, 2),
        ("ssvid", 2, 2),
        ("sn", 4, 20),
        ("mn", 24, 40),
        ("fr", 64, 8),
        ("rab", 72, 1),
        ("ieee", 73, 3),
        ("cmic", 76, 1),
        ("mdts", 77, 1),
        ("cntlid", 78, 2),
        ("ver", 80, 4),
        ("rtd3r", 84, 4),
        ("rtd3e", 88, 4),
        ("oaes", 92, 4),
        ("ctratt", 96, 4),
        ("cntrltype", 111, 1),
        ("fguid", 112, 16),
        ("oacs", 256, 2),
        ("acl", 258, 1),
        ("aerl", 259, 1),
        ("frmw", 260, 1),
        ("lpa", 261, 1),
        ("elpe", 262, 1),
        ("npss", 263, 1),
        ("avscc", 264, 1),
        ("wctemp", 266, 2),
        ("cctemp", 268, 2),
        ("kas", 320, 2),
        ("sqes", 512, 1),
        ("cqes", 513, 1),
        ("maxcmd", 514, 2),
        ("nn", 516, 4),
        ("oncs", 520, 2),
        ("fuses", 522, 2),
        ("fna", 524, 1),
        ("vwc", 525, 1),
        ("awun", 526, 2),
        ("awupf", 528, 2),
        ("acwu", 532, 2),
        ("sgls", 536, 4),
        ("mnan", 540, 4),
        ("subnqn", 768, 256),
        ("ioccsz", 1792, 4),
        ("iorcsz", 1796, 4),
        ("icdoff", 1800, 2),
        ("fcatt", 1802, 1),
        ("msdbd", 1803, 1),
        ("ofcs", 1804, 2),
    ]);
    check::<IdentifyNamespace>(&[
        ("nsze", 0, 8),
        ("ncap", 8, 8),
        ("nuse", 16, 8),
        ("nsfeat", 24, 1),
        ("nlbaf", 25, 1),
        ("flbas", 26, 1),
        ("mc", 27, 1),
        ("dpc", 28, 1),
        ("dps", 29, 1),
        ("nmic", 30, 1),
        ("rescap", 31, 1),
        ("fpi", 32, 1),
        ("dlfeat", 33, 1),
        ("nawun", 34, 2),
        ("nawupf", 36, 2),
        ("nacwu", 38, 2),
        ("nabsn", 40, 2),
        ("nabo", 42, 2),
        ("nabspf", 44, 2),
        ("noiob", 46, 2),
        ("nvmcap", 48, 16),
        ("npwg", 64, 2),
        ("npwa", 66, 2),
        ("npdg", 68, 2),
        ("npda", 70, 2),
        ("nows", 72, 2),
        ("mssrl", 74, 2),
        ("mcl", 76, 4),
        ("msrc", 80, 1),
        ("nulbaf", 82, 1),
        ("anagrpid", 92, 4),
        ("nsattr", 99, 1),
        ("nvmsetid", 100, 2),
        ("endgid", 102, 2),
        ("nguid", 104, 16),
        ("eui64", 120, 8),
        ("lbaf", 128, 256),
    ]);
    check::<ErrorInformationEntry>(&[
        ("error_count", 0, 8),
        ("sqid", 8, 2),
        ("cid", 10, 2),
        ("status_field", 12, 2),
        ("parameter_error_location", 14, 2),
        ("lba", 16, 8),
        ("nsid", 24, 4),
        ("vs", 28, 1),
        ("trtype", 29, 1),
        ("cs", 32, 8),
        ("trtype_specific", 40, 2),
    ]);
    check::<SmartLog>(&[
        ("critical_warning", 0, 1),
        ("temperature", 1, 2),
        ("avail_spare", 3, 1),
        ("spare_thresh", 4, 1),
        ("percent_used", 5, 1),
        ("endurance_group_warning", 6, 1),
        ("data_units_read", 32, 16),
        ("data_units_written", 48, 16),
        ("host_reads", 64, 16),
        ("host_writes", 80, 16),
        ("ctrl_busy_time", 96, 16),
        ("power_cycles", 112, 16),
        ("power_on_hours", 128, 16),
        ("unsafe_shutdowns", 144, 16),
        ("media_errors", 160, 16),
        ("num_err_log_entries", 176, 16),
        ("warning_temp_time", 192, 4),
        ("critical_comp_time", 196, 4),
        ("temp_sensors", 200, 16),
        ("thm_temp1_trans_count", 216, 4),
        ("thm_temp2_trans_count", 220, 4),
        ("thm_temp1_total_time", 224, 4),
        ("thm_temp2_total_time", 228, 4),
    ]);
    check::<DiscoveryLogEntry>(&[
        ("trtype", 0, 1),
        ("adrfam", 1, 1),
        ("subtype", 2, 1),
        ("treq", 3, 1),
        ("portid", 4, 2),
        ("cntlid", 6, 2),
        ("asqsz", 8, 2),
        ("eflags", 10, 2),
        ("trsvcid", 32, 32),
        ("subnqn", 256, 256),
        ("traddr", 512, 256),
        ("tsas", 768, 256),
    ]);
    check::<ConnectData>(&[
        ("hostid", 0, 16),
        ("cntlid", 16, 2),
        ("subnqn", 256, 256),
        ("hostnqn", 512, 256),
    ]);
    check::<DsmRange>(&[("cattr", 0, 4), ("nlb", 4, 4), ("slba", 8, 8)]);
    check::<CopySourceRange>(&[
        ("slba", 8, 8),
        ("nlb", 16, 2),
        ("eilbrt", 24, 4),
        ("elbat", 28, 2),
        ("elbatm", 30, 2),
    ]);
}
