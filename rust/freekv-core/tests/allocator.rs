//! Allocator properties: no page handed out twice, stale generations rejected, reference
//! counts exact, failed batch calls change nothing. Checked against a simple model.

use std::collections::HashMap;

use freekv_core::{FreeKvError, PageId, PageTable};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Retain(usize),
    Release(usize),
    ReleaseStale(usize),
    ReleaseTwiceInOneBatch(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..6).prop_map(Op::Alloc),
        any::<usize>().prop_map(Op::Retain),
        any::<usize>().prop_map(Op::Release),
        any::<usize>().prop_map(Op::ReleaseStale),
        any::<usize>().prop_map(Op::ReleaseTwiceInOneBatch),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_model(capacity in 1usize..12, ops in prop::collection::vec(op(), 1..80)) {
        let mut t = PageTable::new(capacity).unwrap();
        // Model: live id -> holders; every id ever freed.
        let mut live: HashMap<PageId, u32> = HashMap::new();
        let mut dead: Vec<PageId> = Vec::new();
        for op in ops {
            let mut keys: Vec<PageId> = live.keys().copied().collect();
            keys.sort();
            match op {
                Op::Alloc(n) => match t.alloc(n) {
                    Ok(ids) => {
                        prop_assert_eq!(ids.len(), n);
                        for id in ids {
                            // Never handed out twice while live.
                            prop_assert!(live.keys().all(|l| l.slot() != id.slot()));
                            prop_assert!(!dead.contains(&id), "reissued a dead id");
                            live.insert(id, 1);
                        }
                    }
                    Err(FreeKvError::PoolExhausted { requested, free, capacity: c }) => {
                        prop_assert_eq!((requested, c), (n, capacity));
                        prop_assert!(n > capacity - live.len());
                        prop_assert_eq!(free, capacity - live.len());
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
                Op::Retain(i) if !keys.is_empty() => {
                    let id = keys[i % keys.len()];
                    t.retain(&[id]).unwrap();
                    *live.get_mut(&id).unwrap() += 1;
                }
                Op::Release(i) if !keys.is_empty() => {
                    let id = keys[i % keys.len()];
                    let freed = t.release(&[id]).unwrap();
                    let rc = live.get_mut(&id).unwrap();
                    *rc -= 1;
                    prop_assert_eq!(freed, usize::from(*rc == 0));
                    if *rc == 0 {
                        live.remove(&id);
                        dead.push(id);
                    }
                }
                Op::ReleaseStale(i) if !dead.is_empty() => {
                    let id = dead[i % dead.len()];
                    let is_stale = matches!(
                        t.release(&[id]), Err(FreeKvError::StaleHandle { .. })
                    );
                    prop_assert!(is_stale);
                    let stale_rc = matches!(t.refcount(id), Err(FreeKvError::StaleHandle { .. }));
                    prop_assert!(stale_rc);
                }
                Op::ReleaseTwiceInOneBatch(i) if !keys.is_empty() => {
                    let id = keys[i % keys.len()];
                    let rc = live[&id];
                    let r = t.release(&[id, id]);
                    if rc >= 2 {
                        prop_assert_eq!(r.unwrap(), usize::from(rc == 2));
                        if rc == 2 {
                            live.remove(&id);
                            dead.push(id);
                        } else {
                            *live.get_mut(&id).unwrap() -= 2;
                        }
                    } else {
                        let stale = matches!(r, Err(FreeKvError::StaleHandle { .. }));
                        prop_assert!(stale);
                    }
                }
                _ => {}
            }
            t.check_invariants().unwrap();
            prop_assert_eq!(t.used_pages(), live.len());
            prop_assert_eq!(t.free_pages(), capacity - live.len());
            for (&id, &rc) in &live {
                prop_assert_eq!(t.refcount(id).unwrap(), rc);
            }
        }
    }
}

#[test]
fn forged_ids_are_stale() {
    let mut t = PageTable::new(4).unwrap();
    let id = t.alloc(1).unwrap()[0];
    for raw in [
        0,
        id.raw() + 1 + (1 << 32),
        (u64::from(id.generation()) << 32) | 99,
    ] {
        assert!(matches!(
            t.refcount(PageId::from_raw(raw)),
            Err(FreeKvError::StaleHandle { .. })
        ));
    }
}
