//! The agent's memory over time: RSS samples boiled down to first,
//! median, max and last, and the least-squares slope over the second half
//! of the run (flat, or growing).

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct Rss {
    pub samples: Vec<(f64, u64)>,
    pub first_mib: Option<f64>,
    pub median_mib: Option<f64>,
    pub max_mib: Option<f64>,
    pub last_mib: Option<f64>,
    /// Least-squares slope over the second half of the samples.
    pub second_half_mib_per_min: Option<f64>,
    /// That slope times the second half's length.
    pub second_half_growth_mib: Option<f64>,
    pub second_half_seconds: Option<f64>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub fn rss(samples: &[(f64, u64)]) -> Rss {
    let values: Vec<f64> = samples.iter().map(|&(_, k)| mib(k)).collect();
    let mut r = Rss {
        samples: samples.to_vec(),
        first_mib: values.first().copied(),
        median_mib: median(&values),
        max_mib: values.iter().copied().reduce(f64::max),
        last_mib: values.last().copied(),
        ..Rss::default()
    };
    let Some(&(end, _)) = samples.last() else {
        return r;
    };
    let half: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _)| *t >= end / 2.0)
        .map(|&(t, k)| (t, mib(k)))
        .collect();
    if let Some(slope) = slope(&half) {
        let span = half.last().map_or(0.0, |l| l.0) - half[0].0;
        r.second_half_mib_per_min = Some(slope * 60.0);
        r.second_half_growth_mib = Some(slope * span);
        r.second_half_seconds = Some(span);
    }
    r
}

/// Least-squares slope of y over x; None with fewer than 5 points.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 5 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 0.5 * i as f64)).collect();
        assert!((slope(&line).unwrap() - 0.5).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, if i % 2 == 0 { 1.0 } else { 2.0 }))
            .collect();
        assert!(slope(&flat).unwrap().abs() < 0.2);
        assert_eq!(slope(&line[..4]), None);
    }

    #[test]
    fn rss_growth_over_the_second_half() {
        // Flat at 60 MiB for 60 s, then +1 MiB every 6 s: +5 MiB/30 s.
        let samples: Vec<(f64, u64)> = (0..=60)
            .step_by(2)
            .map(|t| {
                let mib = if t <= 30 { 60.0 } else { 60.0 + (t - 30) as f64 / 6.0 };
                (t as f64, (mib * 1024.0) as u64)
            })
            .collect();
        let r = rss(&samples);
        assert_eq!(r.first_mib, Some(60.0));
        assert!((r.second_half_growth_mib.unwrap() - 5.0).abs() < 0.5, "{r:?}");
        assert!((r.second_half_mib_per_min.unwrap() - 10.0).abs() < 1.0, "{r:?}");
    }
}
