//! Comparing what the tracer reported with the ground truth.

use std::collections::BTreeSet;

/// Asserts that `reported` and `truth` hold the same cookies (as sets), and
/// that `reported` has no duplicates. On failure shows what is missing
/// (in truth, not reported) and what is extra (reported, not in truth).
pub fn assert_same_cookies(reported: &[u64], truth: &[u64], context: &str) {
    let rep: BTreeSet<u64> = reported.iter().copied().collect();
    let tru: BTreeSet<u64> = truth.iter().copied().collect();
    let mut dups: Vec<u64> = reported.to_vec();
    dups.sort_unstable();
    let dups: BTreeSet<u64> = dups.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    let missing: Vec<u64> = tru.difference(&rep).copied().collect();
    let extra: Vec<u64> = rep.difference(&tru).copied().collect();
    if missing.is_empty() && extra.is_empty() && dups.is_empty() {
        return;
    }
    panic!(
        "cookie sets differ ({} reported, {} in ground truth)\n  \
         missing (kernel has them, not reported): {missing:?}\n  \
         extra (reported, kernel does not have them): {extra:?}\n  \
         reported more than once: {dups:?}\n{context}",
        rep.len(),
        tru.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_sets() {
        assert_same_cookies(&[3, 1, 2], &[1, 2, 3], "");
        let r = std::panic::catch_unwind(|| assert_same_cookies(&[1, 2, 9], &[1, 2, 3], "ctx"));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("missing (kernel has them, not reported): [3]"), "{msg}");
        assert!(
            msg.contains("extra (reported, kernel does not have them): [9]"),
            "{msg}"
        );
        assert!(std::panic::catch_unwind(|| assert_same_cookies(&[1, 1], &[1], "")).is_err());
    }
}
