//! Pure pieces of the rate limiter: rates, bandwidths and GCRA, with the clock passed in so
//! tests never sleep.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// New connections per interval, written `50/s`, `3000/m`, `10/h` or `5/250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// Time between two conforming connections, in nanoseconds (at least 1).
    pub fn period_ns(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count.max(1))).clamp(1, u128::from(u64::MAX)) as u64
    }
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate like 50/s, 3000/m, 10/h or 5/250ms");
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        let per = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if count == 0 || per.is_zero() {
            return Err(format!(
                "{s:?}: a rate needs a count and an interval above zero"
            ));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match (self.per.as_secs(), self.per.subsec_nanos()) {
            (1, 0) => "s".to_string(),
            (60, 0) => "m".to_string(),
            (3600, 0) => "h".to_string(),
            _ => humantime::format_duration(self.per).to_string(),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// A per-connection bandwidth cap in bits per second, written `10Mbit/s`, `500kbit/s`,
/// `1Gbit/s`, `800bit/s`, or in bytes: `2MB/s` (decimal units: k = 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Bandwidth(pub u64);

impl TryFrom<String> for Bandwidth {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a bandwidth like 10Mbit/s, 500kbit/s or 2MB/s");
        let body = s.trim().strip_suffix("/s").ok_or_else(bad)?;
        let split = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, unit) = body.split_at(split);
        let num: f64 = num.parse().map_err(|_| bad())?;
        let factor: f64 = match unit.trim() {
            "bit" => 1.0,
            "kbit" => 1e3,
            "Mbit" => 1e6,
            "Gbit" => 1e9,
            "B" => 8.0,
            "kB" => 8e3,
            "MB" => 8e6,
            "GB" => 8e9,
            _ => return Err(bad()),
        };
        let bits = num * factor;
        if !(bits >= 1.0 && bits < u64::MAX as f64) {
            return Err(format!("{s:?}: out of range"));
        }
        Ok(Bandwidth(bits.round() as u64))
    }
}

/// Generic cell rate algorithm: one timestamp (the theoretical arrival time, TAT) per key
/// instead of a token count, so the shared state is a single number a compare-and-set can
/// guard. A connection at `now` conforms when `TAT - now <= tau`; it then moves the TAT on by
/// one period. With `tau = burst × period`, any window of length `W` admits at most
/// `W / period + burst + 1` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub period_ns: u64,
    pub tau_ns: u64,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u32) -> Self {
        let period_ns = rate.period_ns();
        Gcra {
            period_ns,
            tau_ns: period_ns.saturating_mul(u64::from(burst)),
        }
    }

    /// `Ok(new TAT)` when a connection at `now` conforms, else `Err(ns until it would)`.
    pub fn check(&self, tat: Option<u64>, now: u64) -> Result<u64, u64> {
        let tat = tat.unwrap_or(now).max(now);
        let ahead = tat - now;
        if ahead > self.tau_ns {
            Err(ahead - self.tau_ns)
        } else {
            Ok(tat.saturating_add(self.period_ns))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let r = Rate::try_from("50/s".to_string()).unwrap();
        assert_eq!(r.period_ns(), 20_000_000);
        assert_eq!(
            Rate::try_from("3000/m".to_string()).unwrap().period_ns(),
            20_000_000
        );
        assert_eq!(
            Rate::try_from("5/250ms".to_string()).unwrap().period_ns(),
            50_000_000
        );
        for bad in ["50", "0/s", "x/s", "5/never", "5/0s"] {
            assert!(Rate::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_print_as_written() {
        for s in ["50/s", "3000/m", "10/h", "5/250ms"] {
            assert_eq!(Rate::try_from(s.to_string()).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bandwidths_parse() {
        let b = |s: &str| Bandwidth::try_from(s.to_string()).map(|b| b.0);
        assert_eq!(b("10Mbit/s"), Ok(10_000_000));
        assert_eq!(b("500kbit/s"), Ok(500_000));
        assert_eq!(b("1.5Gbit/s"), Ok(1_500_000_000));
        assert_eq!(b("2MB/s"), Ok(16_000_000));
        assert_eq!(b("800bit/s"), Ok(800));
        for bad in ["10Mbit", "10 parsecs/s", "Mbit/s", "0bit/s", "-1bit/s"] {
            assert!(b(bad).is_err(), "{bad}");
        }
    }

    /// Drives GCRA with a fake clock: `arrivals` connections spread evenly over `span_ns`.
    fn admitted(g: &Gcra, arrivals: u64, span_ns: u64) -> u64 {
        let mut tat = None;
        let mut ok = 0;
        for i in 0..arrivals {
            let now = 1_000_000_000 + i * span_ns / arrivals;
            if let Ok(t) = g.check(tat, now) {
                tat = Some(t);
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn burst_then_steady_rate() {
        let g = Gcra::new(Rate::try_from("10/s".to_string()).unwrap(), 4);
        let mut tat = None;
        let now = 5_000_000_000;
        let mut ok = 0;
        for _ in 0..20 {
            if let Ok(t) = g.check(tat, now) {
                tat = Some(t);
                ok += 1;
            }
        }
        assert_eq!(ok, 5, "burst 4 admits 5 at once");
        assert!(g.check(tat, now).is_err());
        assert!(
            g.check(tat, now + 100_000_000).is_ok(),
            "one period later, one more"
        );
    }

    #[test]
    fn any_window_stays_within_rate_times_window_plus_burst_plus_one() {
        for (rate, burst) in [("10/s", 0u32), ("50/s", 10), ("7/100ms", 3)] {
            let r = Rate::try_from(rate.to_string()).unwrap();
            let g = Gcra::new(r, burst);
            for window_ms in [100u64, 1000, 2500] {
                let window = window_ms * 1_000_000;
                let bound = window / g.period_ns + u64::from(burst) + 1;
                // Far more arrivals than the rate: the limiter decides.
                let got = admitted(&g, 5000, window);
                assert!(
                    got <= bound,
                    "{rate} burst {burst} over {window_ms}ms: {got} > {bound}"
                );
                assert!(
                    got + 1 >= bound,
                    "{rate} burst {burst} over {window_ms}ms: only {got} of {bound}"
                );
            }
        }
    }
}
