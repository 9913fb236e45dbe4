//! Stranded capacity as the metric exports it (`cluster::capacity`).

use super::*;

#[test]
fn a_deleted_pool_s_stranded_series_go_and_the_others_stay() {
    use crate::domain::pool::{BillingMode, CreateRequest, PoolType};
    use crate::domain::tenant::Quota;
    let mut c = open_mem(0);
    for n in ["n1", "n2", "n3"] {
        c.register_node(n, inventory(2), 0).unwrap();
    }
    let quota = Quota {
        max_dedicated_nodes: 2,
        max_gpus: 8,
    };
    c.create_tenant(&admin(), "t", quota, 0).unwrap();
    let spec_name = c.nodes().next().unwrap().spec_name();
    let req = CreateRequest {
        pool_type: Some(PoolType::Train),
        name: "mine".into(),
        spec: spec_name,
        node_count: 1,
        billing_mode: Some(BillingMode::OnDemand),
        ..Default::default()
    };
    let pool = c.create_pool(&Caller::tenant("t"), req, 0, 1).unwrap();
    let metrics = crate::metrics::Metrics::new();
    let series = |m: &crate::metrics::Metrics, pool: &str| {
        m.encode()
            .lines()
            .filter(|l| {
                l.starts_with("gpupool_gpus_stranded_milli{")
                    && l.contains(&format!("pool=\"{pool}\""))
            })
            .count()
    };
    metrics.sample(&c, 0, &c.stranded(&admin(), None));
    let causes = crate::domain::stranded::CAUSES.len();
    assert_eq!(series(&metrics, "public"), causes);
    assert_eq!(series(&metrics, &pool.pool_id), causes);
    let mut out = Outbox::new();
    c.delete_pool(&Caller::tenant("t"), &pool.pool_id, true, 10, &mut out)
        .unwrap();
    metrics.sample(&c, 0, &c.stranded(&admin(), None));
    assert_eq!(
        series(&metrics, &pool.pool_id),
        0,
        "the deleted pool's series went"
    );
    assert_eq!(series(&metrics, "public"), causes);
}
