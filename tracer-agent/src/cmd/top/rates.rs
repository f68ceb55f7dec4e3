//! Rates over the refresh interval, from two readings of cumulative counters — what
//! Prometheus' `rate()` and `histogram_quantile()` do, for one interval.
use crate::serve::api::{Histogram, PathRow};

/// Per-second rates of one path between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct PathRates {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
    pub unanswered_syns: f64,
    pub resets: f64,
    /// Handshake time quantiles of the handshakes completed in the interval (None: none were).
    pub handshake_p50: Option<Quantile>,
    pub handshake_p99: Option<Quantile>,
}

impl PathRates {
    /// `previous` is None for a path first seen in this interval: it counted from zero.
    pub(super) fn between(previous: Option<&PathRow>, current: &PathRow, seconds: f64) -> Self {
        let zero = PathRow::default();
        let previous = previous.unwrap_or(&zero);
        let rate = |field: fn(&PathRow) -> u64| growth(field(previous), field(current)) / seconds;
        let handshakes = bucket_growth(&previous.handshakes, &current.handshakes);
        Self {
            packets: rate(|row| row.forward_packets + row.reply_packets),
            bytes: rate(|row| row.forward_bytes + row.reply_bytes),
            new_flows: rate(|row| row.flows),
            unanswered_syns: rate(|row| row.unanswered_syns),
            resets: rate(|row| row.resets),
            handshake_p50: quantile(0.5, &handshakes),
            handshake_p99: quantile(0.99, &handshakes),
        }
    }
}

/// How much a cumulative counter grew; a counter that went down was reset (the agent
/// restarted) and counted from zero since, as Prometheus assumes.
pub(super) fn growth(previous: u64, current: u64) -> f64 {
    if current >= previous {
        (current - previous) as f64
    } else {
        current as f64
    }
}

/// Handshakes completed in the interval: (upper bound, cumulative count) per finite bucket,
/// and the total (the +Inf bucket).
#[derive(Debug, Default, PartialEq)]
pub(super) struct BucketGrowth {
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

fn bucket_growth(previous: &Histogram, current: &Histogram) -> BucketGrowth {
    let reset = current.count < previous.count;
    let before = |index: usize, bound: f64| -> u64 {
        match previous.buckets.get(index) {
            Some(&(previous_bound, count)) if !reset && previous_bound == bound => count,
            _ => 0,
        }
    };
    BucketGrowth {
        buckets: current
            .buckets
            .iter()
            .enumerate()
            .map(|(index, &(bound, count))| (bound, growth(before(index, bound), count)))
            .collect(),
        count: growth(if reset { 0 } else { previous.count }, current.count),
    }
}

/// A quantile as far as the buckets tell it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Quantile {
    /// In the first bucket: below its bound, and nothing more is known.
    Below(f64),
    /// Interpolated linearly between the bounds of the bucket it falls in.
    Within(f64),
    /// Past the last finite bound.
    Above(f64),
}

impl Quantile {
    /// Seconds, for sorting: the estimate, or the bound.
    pub(super) fn seconds(self) -> f64 {
        match self {
            Self::Below(bound) | Self::Within(bound) | Self::Above(bound) => bound,
        }
    }
}

/// The `q` quantile of a histogram, as Prometheus' `histogram_quantile()` computes it, except
/// that the first bucket, whose lower end is unknown, answers "below its bound" rather than
/// an interpolation from zero.
pub(super) fn quantile(q: f64, histogram: &BucketGrowth) -> Option<Quantile> {
    if histogram.count <= 0.0 {
        return None;
    }
    let rank = q * histogram.count;
    let mut lower: Option<(f64, f64)> = None;
    for &(bound, cumulative) in &histogram.buckets {
        let (lower_bound, below) = lower.unwrap_or((0.0, 0.0));
        if cumulative >= rank && cumulative > below {
            return Some(match lower {
                None => Quantile::Below(bound),
                Some(_) => {
                    let within = (rank - below) / (cumulative - below);
                    Quantile::Within(lower_bound + (bound - lower_bound) * within)
                }
            });
        }
        lower = Some((bound, cumulative));
    }
    lower.map(|(bound, _)| Quantile::Above(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshakes(buckets: &[(f64, u64)], count: u64) -> Histogram {
        Histogram {
            count,
            sum_seconds: 0.0,
            buckets: buckets.to_vec(),
        }
    }

    fn row(packets: u64, bytes: u64, flows: u64, handshakes: Histogram) -> PathRow {
        PathRow {
            path: "pod_to_pod_local".into(),
            nat: "none".into(),
            forward_packets: packets,
            reply_packets: packets,
            forward_bytes: bytes,
            reply_bytes: bytes,
            flows,
            unanswered_syns: flows / 2,
            resets: flows,
            handshakes,
            ..PathRow::default()
        }
    }

    fn assert_close(value: Option<Quantile>, expected: f64) {
        let Some(Quantile::Within(value)) = value else {
            panic!("{value:?} is not an interpolation");
        };
        assert!(
            (value - expected).abs() < 1e-12,
            "{value} is not {expected}"
        );
    }

    const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    #[test]
    fn rates_divide_the_growth_by_the_interval() {
        let before = row(10, 1_000, 2, handshakes(&[], 0));
        let after = row(30, 5_000, 6, handshakes(&[], 0));
        let rates = PathRates::between(Some(&before), &after, 2.0);
        assert_eq!(rates.packets, 20.0); // (60 - 20) / 2
        assert_eq!(rates.bytes, 4_000.0);
        assert_eq!(rates.new_flows, 2.0);
        assert_eq!(rates.unanswered_syns, 1.0);
        assert_eq!(rates.resets, 2.0);
        assert_eq!(rates.handshake_p50, None, "no handshake in the interval");
    }

    #[test]
    fn a_new_path_counts_from_zero_and_a_reset_counter_restarts() {
        let fresh = row(5, 100, 1, handshakes(&[], 0));
        assert_eq!(PathRates::between(None, &fresh, 1.0).bytes, 200.0);
        let before = row(500, 100_000, 10, handshakes(&[], 0));
        assert_eq!(PathRates::between(Some(&before), &fresh, 1.0).bytes, 200.0);
    }

    #[test]
    fn quantiles_come_from_the_interval_only() {
        let bounds =
            |counts: [u64; 3]| -> Vec<(f64, u64)> { BOUNDS.iter().copied().zip(counts).collect() };
        // 100 old handshakes, all under 1 ms; then 10 new ones between 1 and 10 ms.
        let before = row(1, 1, 1, handshakes(&bounds([100, 100, 100]), 100));
        let after = row(1, 1, 1, handshakes(&bounds([100, 110, 110]), 110));
        let rates = PathRates::between(Some(&before), &after, 1.0);
        // Rank 5 of 10 in (1 ms, 10 ms]: halfway.
        assert_close(rates.handshake_p50, 0.0055);
        assert_close(rates.handshake_p99, 0.00991);
    }

    #[test]
    fn quantile_interpolates_between_bounds_and_says_below_or_above_them() {
        let histogram = |buckets: &[(f64, f64)], count: f64| BucketGrowth {
            buckets: buckets.to_vec(),
            count,
        };
        let h = histogram(&[(0.001, 4.0), (0.01, 4.0), (0.1, 8.0)], 8.0);
        assert_eq!(quantile(0.25, &h), Some(Quantile::Below(0.001)));
        // Rank 4 is reached in the first bucket; the empty second one is skipped.
        assert_eq!(quantile(0.5, &h), Some(Quantile::Below(0.001)));
        assert_close(quantile(0.75, &h), 0.055);
        let slow = histogram(&[(0.001, 0.0), (0.01, 1.0)], 4.0);
        assert_eq!(quantile(0.99, &slow), Some(Quantile::Above(0.01)));
        assert_eq!(quantile(0.5, &histogram(&[], 0.0)), None);
    }

    #[test]
    fn bucket_growth_after_an_agent_restart_counts_from_zero() {
        let before = handshakes(&[(0.001, 50), (0.01, 60)], 60);
        let after = handshakes(&[(0.001, 1), (0.01, 2)], 2);
        assert_eq!(
            bucket_growth(&before, &after),
            BucketGrowth {
                buckets: vec![(0.001, 1.0), (0.01, 2.0)],
                count: 2.0
            }
        );
    }
}
