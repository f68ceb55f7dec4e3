//! The agent's own CPU time, resident memory and start time, read from `/proc` at scrape time:
//! what the `process_*` metrics of every Prometheus client report.
use std::io;

/// What the kernel accounts to this process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Usage {
    /// User plus system time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    /// Since the Unix epoch.
    pub start_time_seconds: f64,
}

impl Usage {
    pub(crate) fn read() -> io::Result<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let boot_time = boot_time_seconds(&std::fs::read_to_string("/proc/stat")?)?;
        // SAFETY: sysconf reads a configuration value and has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if ticks <= 0 || page <= 0 {
            return Err(io::Error::other("sysconf: no clock tick or page size"));
        }
        parse_stat(&stat, ticks as f64, page as u64, boot_time)
    }
}

/// Fields of `/proc/self/stat` (man 5 proc), counted from 1.
const UTIME: usize = 14;
const STIME: usize = 15;
const STARTTIME: usize = 22;
const RSS: usize = 24;

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(
    stat: &str,
    ticks_per_second: f64,
    page_size: u64,
    boot_time: u64,
) -> io::Result<Usage> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/self/stat");
    let after_name = &stat[stat.rfind(')').ok_or_else(malformed)? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (the state).
    let field = |number: usize| -> io::Result<u64> {
        fields
            .get(number - 3)
            .and_then(|text| text.parse().ok())
            .ok_or_else(malformed)
    };
    Ok(Usage {
        cpu_seconds: (field(UTIME)? + field(STIME)?) as f64 / ticks_per_second,
        resident_bytes: field(RSS)? * page_size,
        start_time_seconds: boot_time as f64 + field(STARTTIME)? as f64 / ticks_per_second,
    })
}

/// `btime` of `/proc/stat`: when the system booted, in seconds since the epoch.
fn boot_time_seconds(stat: &str) -> io::Result<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no btime in /proc/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_tricky_name() {
        // Fields 3… of a real line; the name holds a space and a parenthesis.
        let stat = "4242 (tracer (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 \
                    9 0 123400 123456789 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1";
        let usage = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(usage.cpu_seconds, 3.0);
        assert_eq!(usage.resident_bytes, 2560 * 4096);
        assert_eq!(usage.start_time_seconds, 1_700_001_234.0);
        assert!(parse_stat("4242 (tracer) S 1", 100.0, 4096, 0).is_err());
    }

    #[test]
    fn reads_this_process() {
        let usage = Usage::read().expect("/proc is mounted");
        assert!(usage.resident_bytes > 1 << 20, "{usage:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(usage.start_time_seconds <= now + 1.0, "{usage:?}");
        assert!(usage.start_time_seconds > now - 86_400.0, "{usage:?}");
        assert_eq!(
            boot_time_seconds("cpu 1 2\nbtime 1700000000\n").unwrap(),
            1_700_000_000
        );
    }
}
