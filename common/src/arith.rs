//! Integer rounding shared by the scheduler's billing and the CLI's usage
//! roll-up, which must round a metered duration the same way.

/// `n / d` rounded half away from zero.
pub fn round_div(n: i128, d: i128) -> i64 {
    let q = (2 * n.abs() + d) / (2 * d);
    (if n < 0 { -q } else { q }) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_away_from_zero() {
        assert_eq!(round_div(5, 10), 1);
        assert_eq!(round_div(4, 10), 0);
        assert_eq!(round_div(-5, 10), -1);
        assert_eq!(round_div(-4, 10), 0);
        assert_eq!(round_div(1_499, 1000), 1);
        assert_eq!(round_div(1_500, 1000), 2);
    }
}
