//! A seeded fault injector to put between a QP and the wire (after smoltcp's
//! `phy::FaultInjector`): drops, duplicates, reorders, corrupts and delays frames,
//! deterministically for a given seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::rc::Time;

/// Probabilities (0.0..=1.0) and delays of the injected faults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Probability a frame is dropped.
    pub drop: f64,
    /// Probability a frame is delivered twice.
    pub duplicate: f64,
    /// Probability a frame is held back by `reorder_delay` so later frames overtake it.
    pub reorder: f64,
    /// Probability one bit of a frame is flipped.
    pub corrupt: f64,
    /// Latency every frame gets.
    pub delay: Duration,
    /// Extra uniformly random latency, 0..=jitter.
    pub jitter: Duration,
    /// Extra latency of a reordered frame.
    pub reorder_delay: Duration,
}

impl FaultConfig {
    /// A perfect link with `delay` latency.
    pub fn perfect(delay: Duration) -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            corrupt: 0.0,
            delay,
            jitter: Duration::ZERO,
            reorder_delay: Duration::ZERO,
        }
    }
}

/// What the injector did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultStats {
    /// Frames offered.
    pub frames: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Frames held back.
    pub reordered: u64,
    /// Frames with a flipped bit.
    pub corrupted: u64,
}

/// The injector.
#[derive(Debug)]
pub struct FaultInjector {
    config: FaultConfig,
    rng: StdRng,
    stats: FaultStats,
}

impl FaultInjector {
    /// An injector with its own RNG seeded by `seed`.
    pub fn new(config: FaultConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            stats: FaultStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> FaultConfig {
        self.config
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p.clamp(0.0, 1.0))
    }

    fn latency(&mut self) -> Duration {
        let j = self.config.jitter.as_nanos() as u64;
        let extra = if j == 0 { 0 } else { self.rng.gen_range(0..=j) };
        self.config.delay + Duration::from_nanos(extra)
    }

    /// Passes one frame sent at `now` through the faults: returns the copies to
    /// deliver with their delivery times (none if dropped).
    pub fn inject(&mut self, now: Time, frame: Vec<u8>) -> Vec<(Time, Vec<u8>)> {
        self.stats.frames += 1;
        if self.chance(self.config.drop) {
            self.stats.dropped += 1;
            return Vec::new();
        }
        let mut frame = frame;
        if !frame.is_empty() && self.chance(self.config.corrupt) {
            self.stats.corrupted += 1;
            let i = self.rng.gen_range(0..frame.len());
            let bit = self.rng.gen_range(0..8);
            frame[i] ^= 1 << bit;
        }
        let mut at = now + self.latency();
        if self.chance(self.config.reorder) {
            self.stats.reordered += 1;
            at = at + self.config.reorder_delay;
        }
        let mut out = Vec::with_capacity(2);
        if self.chance(self.config.duplicate) {
            self.stats.duplicated += 1;
            let later = at + self.latency();
            out.push((later, frame.clone()));
        }
        out.insert(0, (at, frame));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_roughly_calibrated() {
        let cfg = FaultConfig {
            drop: 0.1,
            duplicate: 0.05,
            reorder: 0.05,
            corrupt: 0.01,
            delay: Duration::from_micros(5),
            jitter: Duration::from_micros(2),
            reorder_delay: Duration::from_micros(20),
        };
        let run = |seed| {
            let mut f = FaultInjector::new(cfg, seed);
            let mut out = Vec::new();
            for i in 0..20_000u64 {
                out.extend(f.inject(Time(i * 1000), vec![1, 2, 3, 4]));
            }
            (f.stats(), out)
        };
        let (a, oa) = run(7);
        let (b, ob) = run(7);
        assert_eq!(a, b);
        assert_eq!(oa, ob);
        assert!((1700..2300).contains(&a.dropped), "{a:?}");
        assert!((700..1100).contains(&a.duplicated), "{a:?}");
        assert!((100..300).contains(&a.corrupted), "{a:?}");
        assert_eq!(oa.len() as u64, a.frames - a.dropped + a.duplicated);
        let (c, _) = run(8);
        assert_ne!(a, c);
    }

    #[test]
    fn perfect_link_delays_only() {
        let mut f = FaultInjector::new(FaultConfig::perfect(Duration::from_micros(3)), 1);
        let out = f.inject(Time(10), vec![9]);
        assert_eq!(out, vec![(Time(3010), vec![9])]);
    }
}
