//! Placement shapes learned from a pool's submissions (`cluster::shapes`).

use super::*;

#[test]
fn a_pool_learns_what_its_jobs_ask_for_and_keeps_it_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), 0);
    c.register_node("n1", inventory(2), 0).unwrap();
    assert_eq!(c.typical_shapes("public"), placement::default_shapes());
    let mut out = Outbox::new();
    let mut two = raw(2);
    two.cpu_milli = 4000;
    c.submit(&admin(), two.clone(), 10, &mut out).unwrap();
    c.submit(&admin(), two, 11, &mut out).unwrap(); // queued: counts too
    let t = c.typical_shapes("public");
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!((t[0].num_gpu, t[0].milli, t[0].cpu_milli), (2, 1000, 4000));
    // A refused submission teaches nothing.
    assert!(c.submit(&admin(), raw(-1), 12, &mut out).is_err());
    drop(c);
    let c = open(dir.path(), 100);
    assert_eq!(c.typical_shapes("public"), t);
}

#[test]
fn unreadable_learned_shapes_start_learning_again() {
    let store = MemStore::new();
    store
        .write(&[crate::store::Record::PlacementShapes("{not json")], 0)
        .unwrap();
    let c = Cluster::load(Box::new(store), settings(), 0).unwrap();
    assert_eq!(c.typical_shapes("public"), placement::default_shapes());
}
