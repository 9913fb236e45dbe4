//! Billing arithmetic (R-POOL-1, R-DED-4, R-DED-5, R-CREATE-3/8/9/11/17,
//! R-BILL-1, R-BILL-2, R-DEL-2, R-DEL-3) as pure functions of a metered
//! timeline and `now`. No store, no clock.
//!
//! Money is `i64` micro-units of the configured currency. Rounding happens
//! once, at the record: `amount = round_half_up(unit_price × metered_ms /
//! 3_600_000)`, computed in `i128` so nothing is lost before that. Seconds
//! shown on a record are `metered_ms / 1000` rounded the same way.
//!
//! Months are calendar months in UTC: a term starting on Jan 31 ends on the
//! last day of February at the same time of day (the day is clamped).

use serde::{Deserialize, Serialize};

pub use super::calendar::civil_from_days;
use super::calendar::{days_from_civil, days_in_month};
use super::pool::{BillingMode, PoolType, SubscriptionTerms};

pub const HOUR_MS: i64 = 3_600_000;

/// Prices of one spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpecPrice {
    /// Dedicated pool, on-demand: per node-hour (R-DED-4).
    pub on_demand_node_hour_micros: i64,
    /// Dedicated pool, subscription: per node-month (R-DED-5).
    pub subscription_node_month_micros: i64,
    /// Public pool: per instance-hour on a node of this spec (R-POOL-1).
    pub public_instance_hour_micros: i64,
    /// Public pool, a preemptible job's instance-hour; unset: the public
    /// price.
    pub preemptible_instance_hour_micros: Option<i64>,
}

impl SpecPrice {
    /// What a public instance-hour costs, preemptible or not.
    pub fn public_hour_micros(&self, preemptible: bool) -> i64 {
        match self.preemptible_instance_hour_micros {
            Some(price) if preemptible => price,
            _ => self.public_instance_hour_micros,
        }
    }
}

/// One metered unit (a node of a dedicated pool, or a public job instance)
/// over `[from_ms, to_ms)`; `to_ms` None = still running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub unit: String,
    pub from_ms: i64,
    pub to_ms: Option<i64>,
}

/// From `from_ms` on (until the next entry), the pool is billed in `mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeSpan {
    pub from_ms: i64,
    pub mode: BillingMode,
}

/// One hour (or part of it) of metered use in one billing mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRecord {
    pub hour_start_ms: i64,
    pub mode: BillingMode,
    /// Sum over units of metered milliseconds in this hour and mode.
    pub unit_ms: i64,
    /// Units metered in this hour and mode.
    pub quantity: u32,
    pub unit_price_micros: i64,
    pub amount_micros: i64,
}

impl HourRecord {
    pub fn seconds(&self) -> i64 {
        round_div(i128::from(self.unit_ms), 1000)
    }
}

pub use gpupool_common::arith::round_div;

pub fn hour_floor(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

fn overlap(a0: i64, a1: i64, b0: i64, b1: i64) -> i64 {
    (a1.min(b1) - a0.max(b0)).max(0)
}

/// Meters `spans` hour by hour over `[from_ms, until_ms)`. Hours are split
/// where `modes` change (a conversion mid-hour gives two records for that
/// hour, R-BILL-1). On-demand time costs `hour_price_micros` per unit-hour;
/// subscription time is recorded with amount 0 (the order paid for it).
/// Time before the first mode span is not billed.
pub fn meter(
    spans: &[Span],
    modes: &[ModeSpan],
    hour_price_micros: i64,
    from_ms: i64,
    until_ms: i64,
) -> Vec<HourRecord> {
    let mut out = Vec::new();
    if until_ms <= from_ms {
        return out;
    }
    let mut hour = hour_floor(from_ms);
    while hour < until_ms {
        let h0 = hour.max(from_ms);
        let h1 = (hour + HOUR_MS).min(until_ms);
        for (i, m) in modes.iter().enumerate() {
            let m1 = modes.get(i + 1).map_or(i64::MAX, |n| n.from_ms);
            let (s0, s1) = (h0.max(m.from_ms), h1.min(m1));
            if s1 <= s0 {
                continue;
            }
            let mut unit_ms = 0;
            let mut quantity = 0;
            for span in spans {
                let o = overlap(span.from_ms, span.to_ms.unwrap_or(i64::MAX), s0, s1);
                if o > 0 {
                    unit_ms += o;
                    quantity += 1;
                }
            }
            if quantity == 0 {
                continue;
            }
            let unit_price = if m.mode == BillingMode::OnDemand {
                hour_price_micros
            } else {
                0
            };
            out.push(HourRecord {
                hour_start_ms: hour,
                mode: m.mode,
                unit_ms,
                quantity,
                unit_price_micros: unit_price,
                amount_micros: round_div(
                    i128::from(unit_price) * i128::from(unit_ms),
                    i128::from(HOUR_MS),
                ),
            });
        }
        hour += HOUR_MS;
    }
    out
}

/// R-CREATE-8: a 12-month train subscription is billed as 10 months.
/// Deploy pools (1..11 months, R-CREATE-17) pay every month.
pub fn billed_months(pool_type: PoolType, months: u32) -> u32 {
    if pool_type == PoolType::Train && months == 12 {
        10
    } else {
        months
    }
}

/// Price of an order: nodes × node-month price × billed months.
pub fn order_amount(node_month_micros: i64, nodes: u32, billed_months: u32) -> i64 {
    node_month_micros * i64::from(nodes) * i64::from(billed_months)
}

/// `ms` plus `months` calendar months (UTC, day clamped to the month's end).
pub fn add_months(ms: i64, months: u32) -> i64 {
    let day_ms = 86_400_000;
    let days = ms.div_euclid(day_ms);
    let time = ms.rem_euclid(day_ms);
    let (y, m, d) = civil_from_days(days);
    let total = y * 12 + (m - 1) + i64::from(months);
    let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let nd = d.min(days_in_month(ny, nm));
    days_from_civil(ny, nm, nd) * day_ms + time
}

/// "2026-11" of a time.
pub fn month_of(ms: i64) -> String {
    let (y, m, _) = civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}")
}

/// Start of the month named "YYYY-MM".
pub fn month_start(month: &str) -> Option<i64> {
    let (y, m) = month.split_once('-')?;
    let (y, m): (i64, i64) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) {
        return None;
    }
    Some(days_from_civil(y, m, 1) * 86_400_000)
}

/// Pro rata share of `amount` for `[at_ms, end_ms)` out of `[start_ms,
/// end_ms)`, by milliseconds, rounded once. Used for refunds (R-DEL-3) and
/// for scale-out of a subscription pool (charged to the order's end).
pub fn pro_rata(amount_micros: i64, start_ms: i64, end_ms: i64, at_ms: i64) -> i64 {
    let term = (end_ms - start_ms).max(1);
    let left = (end_ms - at_ms.clamp(start_ms, end_ms)).max(0);
    round_div(
        i128::from(amount_micros) * i128::from(left),
        i128::from(term),
    )
}

/// R-BILL-1: conversion needs at least one consumption record with an
/// amount above zero.
pub fn has_consumption(records: &[HourRecord]) -> bool {
    records.iter().any(|r| r.amount_micros > 0)
}

/// The current paid subscription term of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderKind {
    New,
    Renewal,
    Conversion,
    ScaleOut,
    Refund,
}

impl OrderKind {
    pub fn name(self) -> &'static str {
        match self {
            OrderKind::New => "new",
            OrderKind::Renewal => "renewal",
            OrderKind::Conversion => "conversion",
            OrderKind::ScaleOut => "scale_out",
            OrderKind::Refund => "refund",
        }
    }
}

/// A subscription order, or a refund (negative amount).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub seq: u64,
    pub kind: OrderKind,
    pub pool_id: String,
    pub tenant: String,
    pub nodes: u32,
    pub months: u32,
    pub billed_months: u32,
    pub amount_micros: i64,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub created_at_ms: i64,
}

/// One closed hourly ledger row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRow {
    /// "pool:<id>" or "instance:<id>".
    pub subject: String,
    pub tenant: String,
    pub pool_id: String,
    pub job_id: String,
    pub instance_id: String,
    pub spec: String,
    pub hour_start_ms: i64,
    pub mode: BillingMode,
    pub unit_ms: i64,
    pub quantity: u32,
    pub unit_price_micros: i64,
    pub amount_micros: i64,
    /// GPU-milliseconds allocated (whole GPUs count 1000‰, fractions their share).
    #[serde(default)]
    pub gpu_allocated_ms: i64,
    /// GPU-milliseconds used, from utilization samples.
    #[serde(default)]
    pub gpu_used_ms: i64,
    /// A preemptible job's instance, metered at the preemptible price.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
}

impl LedgerRow {
    pub fn seconds(&self) -> i64 {
        round_div(i128::from(self.unit_ms), 1000)
    }
}

/// What happens when a subscription term ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryAction {
    /// R-CREATE-9: a new order for the same duration.
    Renew,
    /// R-BILL-2: on-demand from the expiry on.
    ConvertToOnDemand,
    /// Neither: the pool is frozen (no jobs) for the retention, then released.
    Freeze,
}

pub fn at_expiry(terms: &SubscriptionTerms) -> ExpiryAction {
    if terms.auto_renew {
        ExpiryAction::Renew
    } else if terms.convert_to_on_demand_at_expiry {
        ExpiryAction::ConvertToOnDemand
    } else {
        ExpiryAction::Freeze
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = HOUR_MS;
    // 2026-11-27T10:00:00Z
    const T0: i64 = 1_795_773_600_000;

    fn span(unit: &str, from: i64, to: Option<i64>) -> Span {
        Span {
            unit: unit.into(),
            from_ms: from,
            to_ms: to,
        }
    }

    fn on_demand(from: i64) -> Vec<ModeSpan> {
        vec![ModeSpan {
            from_ms: from,
            mode: BillingMode::OnDemand,
        }]
    }

    #[test]
    fn calendar_months_clamp_the_day() {
        let jan31 = days_from_civil(2026, 1, 31) * 86_400_000 + 5 * H;
        assert_eq!(
            civil_from_days(add_months(jan31, 1).div_euclid(86_400_000)),
            (2026, 2, 28)
        );
        assert_eq!(add_months(jan31, 1).rem_euclid(86_400_000), 5 * H);
        assert_eq!(
            civil_from_days(add_months(jan31, 13).div_euclid(86_400_000)),
            (2027, 2, 28)
        );
        let feb29 = days_from_civil(2028, 2, 29) * 86_400_000;
        assert_eq!(
            civil_from_days(add_months(feb29, 12).div_euclid(86_400_000)),
            (2029, 2, 28)
        );
        assert_eq!(month_of(T0), "2026-11");
        assert_eq!(
            month_start("2026-11").map(month_of).as_deref(),
            Some("2026-11")
        );
        assert_eq!(month_start("2026-13"), None);
    }

    #[test]
    fn rounding_is_half_away_from_zero_once() {
        assert_eq!(round_div(5, 10), 1);
        assert_eq!(round_div(4, 10), 0);
        assert_eq!(round_div(-5, 10), -1);
        // 1 s at 1 micro per hour rounds to 0; 1800 s to 1: once, at the record.
        let r = meter(
            &[span("n", T0, Some(T0 + 1000))],
            &on_demand(T0),
            1,
            T0,
            T0 + H,
        );
        assert_eq!(r[0].amount_micros, 0);
    }

    #[test]
    fn r_pool_1_public_use_is_spec_price_times_duration_times_instances() {
        // Two instances of one job, 90 and 30 minutes, at 3.6 units/hour.
        let spans = [
            span("i0", T0, Some(T0 + 90 * 60_000)),
            span("i1", T0, Some(T0 + 30 * 60_000)),
        ];
        let r = meter(&spans, &on_demand(0), 3_600_000, T0, T0 + 3 * H);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].hour_start_ms, r[0].quantity, r[0].seconds()),
            (T0, 2, 5400)
        );
        assert_eq!(r[0].amount_micros, 5_400_000);
        assert_eq!(
            (r[1].hour_start_ms, r[1].quantity, r[1].seconds()),
            (T0 + H, 1, 1800)
        );
        assert_eq!(r[1].amount_micros, 1_800_000);
    }

    #[test]
    fn r_ded_4_billing_starts_at_creation_whether_jobs_run_or_not() {
        // Created at 10:20, still there at 12:00: 40 + 60 minutes, hours split at the boundary.
        let created = T0 + 20 * 60_000;
        let r = meter(
            &[span("n1", created, None)],
            &on_demand(created),
            1_000_000,
            created,
            T0 + 2 * H,
        );
        assert_eq!(
            r.iter().map(|r| r.seconds()).collect::<Vec<_>>(),
            [2400, 3600]
        );
        assert_eq!(
            r.iter().map(|r| r.amount_micros).sum::<i64>(),
            666_667 + 1_000_000
        );
        assert!(r.iter().all(|r| r.hour_start_ms % H == 0));
    }

    #[test]
    fn r_ded_5_subscription_time_is_recorded_at_zero() {
        let modes = vec![ModeSpan {
            from_ms: T0,
            mode: BillingMode::Subscription,
        }];
        let r = meter(
            &[span("n1", T0, None), span("n2", T0, None)],
            &modes,
            1_000_000,
            T0,
            T0 + H,
        );
        assert_eq!(
            (r[0].quantity, r[0].seconds(), r[0].amount_micros),
            (2, 7200, 0)
        );
        assert_eq!(r[0].mode, BillingMode::Subscription);
    }

    #[test]
    fn r_create_3_both_modes_meter_the_same_time() {
        let modes = vec![
            ModeSpan {
                from_ms: T0,
                mode: BillingMode::OnDemand,
            },
            ModeSpan {
                from_ms: T0 + 15 * 60_000,
                mode: BillingMode::Subscription,
            },
        ];
        let r = meter(&[span("n1", T0, None)], &modes, 4_000_000, T0, T0 + H);
        assert_eq!(r.iter().map(|r| r.unit_ms).sum::<i64>(), H);
    }

    #[test]
    fn r_create_8_twelve_months_are_billed_as_ten() {
        assert_eq!(billed_months(PoolType::Train, 12), 10);
        assert_eq!(billed_months(PoolType::Train, 11), 11);
        assert_eq!(billed_months(PoolType::Train, 1), 1);
        assert_eq!(
            order_amount(2_000_000, 3, billed_months(PoolType::Train, 12)),
            60_000_000
        );
    }

    #[test]
    fn r_create_9_auto_renew_renews_at_expiry() {
        let terms = SubscriptionTerms {
            months: 1,
            auto_renew: true,
            convert_to_on_demand_at_expiry: true,
        };
        assert_eq!(at_expiry(&terms), ExpiryAction::Renew);
    }

    #[test]
    fn r_create_17_deploy_pools_pay_every_month() {
        assert_eq!(billed_months(PoolType::Deploy, 11), 11);
        assert_eq!(billed_months(PoolType::Deploy, 1), 1);
    }

    #[test]
    fn r_bill_1_conversion_needs_a_consumption_record() {
        assert!(!has_consumption(&[]));
        // A pool that existed for less than the smallest billable amount has no consumption.
        let tiny = meter(
            &[span("n", T0, Some(T0 + 1))],
            &on_demand(T0),
            1,
            T0,
            T0 + H,
        );
        assert!(!has_consumption(&tiny));
        let real = meter(
            &[span("n", T0, Some(T0 + H))],
            &on_demand(T0),
            1_000,
            T0,
            T0 + H,
        );
        assert!(has_consumption(&real));
    }

    #[test]
    fn r_bill_1_conversion_mid_hour_splits_the_hour_exactly() {
        let conv = T0 + 20 * 60_000 + 17_000;
        let modes = vec![
            ModeSpan {
                from_ms: T0,
                mode: BillingMode::OnDemand,
            },
            ModeSpan {
                from_ms: conv,
                mode: BillingMode::Subscription,
            },
        ];
        let r = meter(&[span("n1", T0, None)], &modes, 3_600_000, T0, T0 + H);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].mode, r[0].unit_ms, r[0].amount_micros),
            (BillingMode::OnDemand, conv - T0, 1_217_000)
        );
        assert_eq!(
            (r[1].mode, r[1].unit_ms, r[1].amount_micros),
            (BillingMode::Subscription, T0 + H - conv, 0)
        );
        assert_eq!(r[0].hour_start_ms, r[1].hour_start_ms);
    }

    #[test]
    fn r_bill_2_convert_at_expiry_switches_to_on_demand() {
        let terms = SubscriptionTerms {
            months: 1,
            auto_renew: false,
            convert_to_on_demand_at_expiry: true,
        };
        assert_eq!(at_expiry(&terms), ExpiryAction::ConvertToOnDemand);
        let plain = SubscriptionTerms {
            months: 1,
            auto_renew: false,
            convert_to_on_demand_at_expiry: false,
        };
        assert_eq!(at_expiry(&plain), ExpiryAction::Freeze);
    }

    #[test]
    fn r_del_2_cost_stops_when_the_pool_is_deleted() {
        let deleted = T0 + 30 * 60_000;
        let r = meter(
            &[span("n1", T0, Some(deleted))],
            &on_demand(T0),
            1_000_000,
            T0,
            T0 + 5 * H,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].amount_micros, 500_000);
    }

    #[test]
    fn r_del_3_refund_is_pro_rata_by_remaining_seconds() {
        let start = T0;
        let end = add_months(start, 12);
        // 12 months billed as 10: the paid amount is spread evenly over all 12 months.
        let paid = order_amount(1_000_000, 1, billed_months(PoolType::Train, 12));
        assert_eq!(pro_rata(paid, start, end, start), paid);
        let half = start + (end - start) / 2;
        assert_eq!(pro_rata(paid, start, end, half), paid / 2);
        assert_eq!(pro_rata(paid, start, end, end), 0);
        assert_eq!(pro_rata(paid, start, end, end + H), 0);
    }
}
