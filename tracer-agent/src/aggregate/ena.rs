//! The VPC's own limits as the ENA driver counts them on each node ENI: packets the VPC
//! dropped or queued because the instance went over an allowance (bandwidth in and out,
//! packets per second, tracked connections, link-local services), and the connections it can
//! still track. They explain drops that no path shows: the packets never reached the node.
//!
//! The driver's private statistics (see `datapath::ethtool`) are matched by name; a driver too
//! old to report the allowances gives nothing. The driver's counters restart from zero when
//! it resets the device; [`EnaAllowances`] keeps the exported totals monotonic across that.
use std::collections::{BTreeMap, BTreeSet};

use tracer_common::label_enum;
use tracing::{info, warn};

use crate::datapath::ethtool::{Ethtool, EthtoolError};

/// The driver whose statistics carry the allowances.
const ENA_DRIVER: &str = "ena";

label_enum!(
    /// The VPC allowance an ENI went over: the `allowance` label of
    /// `tracer_ena_allowance_exceeded_total`.
    Allowance {
        /// Inbound bandwidth of the instance (`bw_in_allowance_exceeded`).
        BwIn => "bw_in",
        /// Outbound bandwidth of the instance (`bw_out_allowance_exceeded`).
        BwOut => "bw_out",
        /// Packets per second of the instance, both ways (`pps_allowance_exceeded`).
        Pps => "pps",
        /// Connections the instance can have tracked (`conntrack_allowance_exceeded`).
        Conntrack => "conntrack",
        /// Packets per second to the link-local services — Route 53 Resolver (DNS), IMDS,
        /// Time Sync (NTP) — per ENI (`linklocal_allowance_exceeded`).
        Linklocal => "linklocal",
    }
);

impl Allowance {
    /// The driver's name for the statistic counting this allowance's excess.
    pub const fn statistic(self) -> &'static str {
        match self {
            Self::BwIn => "bw_in_allowance_exceeded",
            Self::BwOut => "bw_out_allowance_exceeded",
            Self::Pps => "pps_allowance_exceeded",
            Self::Conntrack => "conntrack_allowance_exceeded",
            Self::Linklocal => "linklocal_allowance_exceeded",
        }
    }
}

/// The driver's statistic of the connections the instance can still have tracked (ENA 2.8.1
/// and later).
const CONNTRACK_AVAILABLE: &str = "conntrack_allowance_available";

/// What one ENI's statistics say about the allowances, as the driver counts them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnaReading {
    /// The driver's count per allowance it reports (all five since ENA 2.2.10).
    pub exceeded: BTreeMap<Allowance, u64>,
    pub conntrack_available: Option<u64>,
}

impl EnaReading {
    /// What the driver of `interface` says: nothing for other drivers than ENA, nor for an
    /// ENA driver too old to count the allowances.
    pub fn read(ethtool: &Ethtool, interface: &str) -> Result<Option<Self>, EthtoolError> {
        if ethtool.driver(interface)?.as_deref() != Some(ENA_DRIVER) {
            return Ok(None);
        }
        Ok(Self::from_statistics(&ethtool.statistics(interface)?))
    }

    /// Picks the allowances out of a driver's statistics by name; `None` when it reports none
    /// of them (an older driver).
    fn from_statistics(statistics: &[(String, u64)]) -> Option<Self> {
        let value_of = |name: &str| {
            statistics
                .iter()
                .find(|(statistic, _)| statistic == name)
                .map(|(_, value)| *value)
        };
        let reading = Self {
            exceeded: Allowance::ALL
                .into_iter()
                .filter_map(|allowance| Some((allowance, value_of(allowance.statistic())?)))
                .collect(),
            conntrack_available: value_of(CONNTRACK_AVAILABLE),
        };
        (reading != Self::default()).then_some(reading)
    }
}

/// One ENI's allowances as exported: totals that never go back, and the latest gauge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnaSeries {
    pub exceeded: BTreeMap<Allowance, u64>,
    pub conntrack_available: Option<u64>,
}

/// A counter that follows a kernel counter but never goes back when the kernel's restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Monotonic {
    /// The kernel's value at the last reading.
    last: u64,
    /// What is exported: the kernel's value plus what it had counted before each restart.
    total: u64,
}

impl Monotonic {
    fn starting_at(value: u64) -> Self {
        Self {
            last: value,
            total: value,
        }
    }

    fn update(&mut self, value: u64) {
        // Below the last reading, the driver started again from zero: all of `value` is new.
        let grown = value.checked_sub(self.last).unwrap_or(value);
        self.total += grown;
        self.last = value;
    }
}

/// The exported allowance series of the node's ENA interfaces, by interface name. Saved for
/// a successor (`restart`) with each counter's last kernel reading, so that a driver reset
/// while no agent runs does not make a total go back either.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct EnaAllowances {
    interfaces: BTreeMap<String, Interface>,
    /// Interfaces whose statistics could not be read at the last poll: logged when they
    /// become so and when they are read again, not every poll.
    #[serde(skip)]
    unreadable: BTreeSet<String>,
}

#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Interface {
    exceeded: BTreeMap<Allowance, Monotonic>,
    conntrack_available: Option<u64>,
}

impl EnaAllowances {
    /// Reads the allowances of the node interfaces `names` (in the calling thread's network
    /// namespace) and takes them in. An interface whose statistics cannot be read keeps its
    /// series as they were.
    pub(crate) fn poll<'a>(&mut self, ethtool: &Ethtool, names: impl Iterator<Item = &'a str>) {
        let mut readings = BTreeMap::new();
        for name in names {
            match EnaReading::read(ethtool, name) {
                Ok(reading) => {
                    if self.unreadable.remove(name) {
                        info!(interface = %name, "driver statistics readable again");
                    }
                    if let Some(reading) = reading {
                        readings.insert(name.to_owned(), Some(reading));
                    }
                }
                Err(error) => {
                    if self.unreadable.insert(name.to_owned()) {
                        warn!(interface = %name, "{error}; its ENA allowances stay as last read");
                    }
                    readings.insert(name.to_owned(), None);
                }
            }
        }
        self.update(readings);
    }

    /// Takes this poll's readings (`None`: unreadable this time, kept as it was); interfaces
    /// not among them (gone, or not ENA) are dropped with their series.
    pub(crate) fn update(&mut self, readings: BTreeMap<String, Option<EnaReading>>) {
        self.interfaces
            .retain(|name, _| readings.contains_key(name));
        self.unreadable.retain(|name| readings.contains_key(name));
        for (name, reading) in readings {
            let Some(reading) = reading else {
                continue;
            };
            let interface = self.interfaces.entry(name).or_default();
            for (allowance, value) in reading.exceeded {
                interface
                    .exceeded
                    .entry(allowance)
                    .and_modify(|counter| counter.update(value))
                    .or_insert_with(|| Monotonic::starting_at(value));
            }
            interface.conntrack_available = reading.conntrack_available;
        }
    }

    /// The series to export, by interface name.
    pub(crate) fn series(&self) -> BTreeMap<String, EnaSeries> {
        self.interfaces
            .iter()
            .map(|(name, interface)| {
                let series = EnaSeries {
                    exceeded: interface
                        .exceeded
                        .iter()
                        .map(|(allowance, counter)| (*allowance, counter.total))
                        .collect(),
                    conntrack_available: interface.conntrack_available,
                };
                (name.clone(), series)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded layout (one name a line) with made-up values: the line number times 10, so
    /// a statistic's value tells where it was.
    fn layout(text: &str) -> Vec<(String, u64)> {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .enumerate()
            .map(|(at, name)| (name.to_owned(), at as u64 * 10))
            .collect()
    }

    fn position(statistics: &[(String, u64)], name: &str) -> u64 {
        statistics
            .iter()
            .position(|(statistic, _)| statistic == name)
            .unwrap_or_else(|| panic!("{name} is not in the layout")) as u64
    }

    #[test]
    fn the_allowances_are_found_by_name_in_a_recorded_ena_layout() {
        let statistics = layout(include_str!(
            "../../tests/fixtures/ena-2.8-ethtool-stats.txt"
        ));
        assert!(statistics.len() > 100, "queue statistics around them");
        let reading = EnaReading::from_statistics(&statistics).expect("allowances");
        for allowance in Allowance::ALL {
            assert_eq!(
                reading.exceeded.get(&allowance),
                Some(&(position(&statistics, allowance.statistic()) * 10)),
                "{allowance}"
            );
        }
        assert_eq!(
            reading.conntrack_available,
            Some(position(&statistics, CONNTRACK_AVAILABLE) * 10)
        );
    }

    #[test]
    fn an_ena_driver_without_allowance_statistics_gives_nothing() {
        let statistics = layout(include_str!(
            "../../tests/fixtures/ena-2.1-ethtool-stats.txt"
        ));
        assert!(statistics.iter().any(|(name, _)| name == "queue_0_tx_cnt"));
        assert_eq!(EnaReading::from_statistics(&statistics), None);
    }

    #[test]
    fn a_driver_before_conntrack_available_reports_the_exceeded_counts_alone() {
        let statistics: Vec<(String, u64)> = layout(include_str!(
            "../../tests/fixtures/ena-2.8-ethtool-stats.txt"
        ))
        .into_iter()
        .filter(|(name, _)| name != CONNTRACK_AVAILABLE)
        .collect();
        let reading = EnaReading::from_statistics(&statistics).expect("allowances");
        assert_eq!(reading.exceeded.len(), Allowance::ALL.len());
        assert_eq!(reading.conntrack_available, None);
    }

    fn reading(linklocal: u64, available: u64) -> EnaReading {
        EnaReading {
            exceeded: BTreeMap::from([(Allowance::Linklocal, linklocal)]),
            conntrack_available: Some(available),
        }
    }

    #[test]
    fn a_driver_reset_does_not_make_the_total_go_back() {
        let mut allowances = EnaAllowances::default();
        let linklocal = |allowances: &EnaAllowances| {
            allowances.series()["eth0"].exceeded[&Allowance::Linklocal]
        };
        allowances.update(BTreeMap::from([(
            "eth0".to_owned(),
            Some(reading(100, 5000)),
        )]));
        assert_eq!(linklocal(&allowances), 100, "starts at the driver's count");
        allowances.update(BTreeMap::from([(
            "eth0".to_owned(),
            Some(reading(130, 4000)),
        )]));
        assert_eq!(linklocal(&allowances), 130);
        // The driver reset the device: its count starts again from zero.
        allowances.update(BTreeMap::from([(
            "eth0".to_owned(),
            Some(reading(7, 6000)),
        )]));
        assert_eq!(linklocal(&allowances), 137);
        allowances.update(BTreeMap::from([(
            "eth0".to_owned(),
            Some(reading(9, 6000)),
        )]));
        assert_eq!(linklocal(&allowances), 139);
        assert_eq!(
            allowances.series()["eth0"].conntrack_available,
            Some(6000),
            "a gauge: the latest value"
        );
        allowances.update(BTreeMap::from([("eth0".to_owned(), None)]));
        assert_eq!(
            linklocal(&allowances),
            139,
            "an unreadable poll keeps the series"
        );
        allowances.update(BTreeMap::new());
        assert!(
            allowances.series().is_empty(),
            "a gone interface's series go"
        );
    }
}
