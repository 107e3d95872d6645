//! The lease protocol, halt markers and reports on a directory store.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::*;
use crate::publish::lock::lock_text;

const SUITE: &str = "production";

fn fleet(dir: &std::path::Path, node: &str) -> Fleet {
    Fleet::with_store(Box::new(DirStore::new(dir.to_path_buf())), SUITE, node)
}

fn lease_file(dir: &std::path::Path, slot: u32) -> std::path::PathBuf {
    dir.join(SUITE).join("leases").join(slot.to_string())
}

/// A lease of `node` that expired a minute ago.
fn write_expired(dir: &std::path::Path, slot: u32, node: &str) {
    let text = lock_text(
        node,
        Utc::now() - chrono::Duration::minutes(2),
        Duration::from_secs(60),
    );
    let path = lease_file(dir, slot);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn holder(dir: &std::path::Path, slot: u32) -> Option<String> {
    let bytes = std::fs::read(lease_file(dir, slot)).ok()?;
    crate::publish::lock::parse_holder(&bytes).map(|h| h.owner)
}

/// `count` nodes ask for one of `slots` at the same moment; the winners.
async fn race(dir: &std::path::Path, slots: u32, count: usize) -> Vec<(String, Lease)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let (fleet, barrier) = (fleet(dir, &format!("node-{n}")), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let lease = fleet
                .take_lease(slots, Duration::from_secs(60))
                .await
                .unwrap();
            lease.map(|lease| (fleet.node_id().to_string(), lease))
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

#[tokio::test]
async fn nodes_racing_for_one_slot_exactly_one_wins() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let winners = race(dir.path(), 1, 8).await;
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert_eq!(holder(dir.path(), 0), Some(winners[0].0.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let winners = race(dir.path(), 3, 8).await;
    let mut slots: Vec<u32> = winners.iter().map(|(_, l)| l.slot()).collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2], "{winners:?}");
}

#[tokio::test]
async fn an_expired_lease_is_broken_by_exactly_one_racer() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        write_expired(dir.path(), 0, "crashed-node");
        let winners = race(dir.path(), 1, 8).await;
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert_eq!(holder(dir.path(), 0), Some(winners[0].0.clone()));
    }
}

#[tokio::test]
async fn a_live_lease_of_another_node_is_not_broken() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fleet(dir.path(), "node-a"), fleet(dir.path(), "node-b"));
    let lease = a.take_lease(1, Duration::from_secs(60)).await.unwrap();
    assert!(lease.is_some());
    assert!(
        b.take_lease(1, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    let leases = b.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].holder.as_deref(), Some("node-a"));
    assert!(!leases[0].expired);
}

#[tokio::test]
async fn a_process_takes_over_its_own_lease_but_a_restarted_node_waits() {
    let dir = tempfile::tempdir().unwrap();
    let first = fleet(dir.path(), "node-a");
    let before = first.take_lease(1, Duration::from_secs(600)).await;
    assert!(before.unwrap().is_some());
    // The same process (a release that failed): its own lease, taken over.
    let again = first
        .take_lease(1, Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.slot(), 0);
    // The process restarted: a new token. The old lease may be another
    // node's with this id, so it is waited out, not taken over; written
    // before this process started, it is no sign of a duplicate.
    let after = fleet(dir.path(), "node-a").with_instance("restarted");
    assert!(
        after
            .take_lease(1, Duration::from_secs(600))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(after.duplicate_seen(), None);
    assert_eq!(holder(dir.path(), 0).as_deref(), Some("node-a"));
    assert!(again.release(&first).await.unwrap());
    assert!(!lease_file(dir.path(), 0).exists());
}

#[tokio::test]
async fn duplicate_node_id_live_lease_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    // Two processes with one id, both running before the lease is taken.
    let (a, b) = (
        fleet(dir.path(), "node-a"),
        fleet(dir.path(), "node-a").with_instance("second"),
    );
    let lease = a
        .take_lease(1, Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    let on_disk = std::fs::read(lease_file(dir.path(), 0)).unwrap();
    assert!(
        b.take_lease(1, Duration::from_secs(600))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(std::fs::read(lease_file(dir.path(), 0)).unwrap(), on_disk);
    let (_, what) = b.duplicate_seen().expect("the duplicate id noticed");
    assert!(what.contains(a.instance()), "{what}");
    assert!(lease.release(&a).await.unwrap());
}

#[tokio::test]
async fn release_by_a_node_that_lost_its_lease_leaves_the_new_holders() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fleet(dir.path(), "node-a"), fleet(dir.path(), "node-b"));
    let mut slow = a
        .take_lease(1, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    // node-a was slower than its TTL: its lease expired and node-b broke it.
    write_expired(dir.path(), 0, "node-a");
    let taken = b.take_lease(1, Duration::from_secs(60)).await.unwrap();
    assert!(taken.is_some());
    assert_eq!(holder(dir.path(), 0).as_deref(), Some("node-b"));
    // Renewing tells node-a; releasing leaves node-b's lease alone.
    assert!(!slow.renew(&a).await.unwrap());
    assert!(!slow.held());
    assert!(!slow.release(&a).await.unwrap());
    assert_eq!(holder(dir.path(), 0).as_deref(), Some("node-b"));
}

#[tokio::test]
async fn renew_pushes_expires_out_and_keeps_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let a = fleet(dir.path(), "node-a");
    let mut lease = a
        .take_lease(2, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let first = lease.expires();
    // Free slots are tried from a random one on.
    let slot = lease.slot();
    assert!(slot < 2);
    let on_disk = |dir| {
        let bytes = std::fs::read(lease_file(dir, slot)).unwrap();
        crate::publish::lock::parse_holder(&bytes).and_then(|h| h.expires)
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(lease.renew(&a).await.unwrap());
    assert!(lease.expires() > first);
    assert_eq!(on_disk(dir.path()), Some(lease.expires()));
    assert!(lease.renew(&a).await.unwrap());
    assert!(lease.release(&a).await.unwrap());
    assert!(a.leases().await.unwrap().is_empty());
}

#[tokio::test]
async fn garbage_in_a_lease_slot_is_broken_not_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let path = lease_file(dir.path(), 0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Unparsable, then one that claims the slot for a century.
    std::fs::write(&path, b"\xff\xfe not a lease").unwrap();
    let a = fleet(dir.path(), "node-a");
    let lease = a
        .take_lease(1, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert!(lease.release(&a).await.unwrap());
    let century = lock_text("hog", Utc::now(), Duration::from_secs(100 * 365 * 86400));
    std::fs::write(&path, century).unwrap();
    assert!(
        a.take_lease(1, Duration::from_secs(60))
            .await
            .unwrap()
            .is_some()
    );
    // Too large to be a lease: also broken.
    std::fs::write(&path, vec![b'x'; 10_000]).unwrap();
    let taken = a.take_lease(1, Duration::from_secs(60)).await.unwrap();
    assert!(taken.is_some());
}

#[tokio::test]
async fn lease_slot_garbage_any_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = lease_file(dir.path(), 0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let live = lock_text("node-x", Utc::now(), Duration::from_secs(600));
    let truncated = live[..live.len() - 20].to_string().into_bytes();
    for (what, garbage) in [
        ("8 KiB", vec![b'x'; 8 * 1024]),
        ("2 MiB", vec![0xff; 2 << 20]),
        ("a truncated lease", truncated),
    ] {
        std::fs::write(&path, &garbage).unwrap();
        let a = fleet(dir.path(), "node-a");
        let lease = a.take_lease(1, Duration::from_secs(60)).await;
        let lease = lease.unwrap_or_else(|e| panic!("{what}: {e}"));
        let lease = lease.unwrap_or_else(|| panic!("{what}: not broken"));
        assert_eq!(holder(dir.path(), 0).as_deref(), Some("node-a"), "{what}");
        // Broken once: the next node finds a live lease and waits.
        let b = fleet(dir.path(), "node-b");
        assert!(
            b.take_lease(1, Duration::from_secs(60))
                .await
                .unwrap()
                .is_none()
        );
        assert!(lease.release(&a).await.unwrap(), "{what}");
    }
}

/// A directory store whose first HEAD runs `before_head` first: another
/// node acting between this node's GET of a slot and its HEAD.
struct HeadRace {
    inner: DirStore,
    before_head: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Store for HeadRace {
    fn url(&self, path: &str) -> String {
        self.inner.url(path)
    }
    fn get<'a>(
        &'a self,
        path: &'a str,
        limit: u64,
    ) -> crate::source::BoxFuture<'a, Result<Option<Stored>, PublishError>> {
        self.inner.get(path, limit)
    }
    fn digest<'a>(
        &'a self,
        path: &'a str,
    ) -> crate::source::BoxFuture<'a, Result<Option<(String, u64)>, PublishError>> {
        self.inner.digest(path)
    }
    fn size<'a>(
        &'a self,
        path: &'a str,
    ) -> crate::source::BoxFuture<'a, Result<Option<u64>, PublishError>> {
        self.inner.size(path)
    }
    fn head<'a>(
        &'a self,
        path: &'a str,
    ) -> crate::source::BoxFuture<'a, Result<Option<crate::publish::store::Head>, PublishError>>
    {
        if let Some(hook) = self.before_head.lock().unwrap().take() {
            hook();
        }
        self.inner.head(path)
    }
    fn put<'a>(
        &'a self,
        path: &'a str,
        body: Body<'a>,
        condition: Condition<'a>,
    ) -> crate::source::BoxFuture<'a, Result<Written, PublishError>> {
        self.inner.put(path, body, condition)
    }
    fn delete<'a>(
        &'a self,
        path: &'a str,
        if_match: Option<&'a str>,
    ) -> crate::source::BoxFuture<'a, Result<bool, PublishError>> {
        self.inner.delete(path, if_match)
    }
    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> crate::source::BoxFuture<'a, Result<Vec<String>, PublishError>> {
        self.inner.list(prefix)
    }
}

/// Two nodes find the same oversized garbage in the only slot. Node A
/// breaks it and writes its live lease between node B's GET (too large)
/// and B's HEAD: B must not break A's lease with the ETag that HEAD
/// returns now. (Seen under load in `lease_slot_garbage_any_size`: two
/// nodes drained at once.)
#[tokio::test]
async fn garbage_broken_by_another_node_between_get_and_head_is_left_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = lease_file(dir.path(), 0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![b'x'; 8 * 1024]).unwrap();
    let root = dir.path().to_path_buf();
    let a_breaks_it = move || {
        // Node A runs elsewhere: a thread with a runtime of its own.
        let lease = std::thread::spawn(move || {
            let a = fleet(&root, "node-a");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(a.take_lease(1, Duration::from_secs(60)))
                .map(|lease| lease.is_some())
        })
        .join()
        .unwrap();
        assert!(matches!(lease, Ok(true)), "node a broke the garbage");
    };
    let b = Fleet::with_store(
        Box::new(HeadRace {
            inner: DirStore::new(dir.path().to_path_buf()),
            before_head: std::sync::Mutex::new(Some(Box::new(a_breaks_it))),
        }),
        SUITE,
        "node-b",
    );
    let taken = b.take_lease(1, Duration::from_secs(60)).await.unwrap();
    assert!(taken.is_none(), "node b took the slot node a holds");
    assert_eq!(holder(dir.path(), 0).as_deref(), Some("node-a"));
}

#[tokio::test]
async fn halt_and_unhalt_a_version_with_an_epoch_and_a_tilde() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fleet(dir.path(), "node-a"), fleet(dir.path(), "node-b"));
    let version = "1:2.0~rc1+b1-1";
    assert_eq!(b.halted("myapp", version).await.unwrap(), None);
    a.halt("myapp", version, "postinst failed\n\u{1b}[2J")
        .await
        .unwrap();
    // A second rollback keeps the first node's reason.
    b.halt("myapp", version, "second").await.unwrap();
    let halt = b.halted("myapp", version).await.unwrap().unwrap();
    assert_eq!(halt.node.as_deref(), Some("node-a"));
    assert_eq!(halt.reason.as_deref(), Some("postinst failed\\n\\u{1b}[2J"));
    assert!(b.halted("myapp", "1:2.0~rc1+b1-2").await.unwrap().is_none());
    assert_eq!(b.halts().await.unwrap(), vec![halt]);
    assert!(
        dir.path()
            .join(SUITE)
            .join("halted/myapp_1%3A2.0%7Erc1+b1-1")
            .exists()
    );

    assert_eq!(b.unhalt("myapp", version).await.unwrap(), [version]);
    assert!(b.unhalt("myapp", version).await.unwrap().is_empty());
    assert_eq!(b.halted("myapp", version).await.unwrap(), None);
    let bad = b.halt("../x", "1.0", "r").await;
    assert!(matches!(bad, Err(FleetError::Invalid { .. })), "{bad:?}");
}

#[tokio::test]
async fn an_unreadable_halt_marker_still_halts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SUITE).join("halted/myapp_1.0");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0xff; 100_000]).unwrap();
    let halt = fleet(dir.path(), "node-a")
        .halted("myapp", "1.0")
        .await
        .unwrap();
    assert_eq!(
        halt.map(|h| (h.version, h.node)),
        Some(("1.0".to_string(), None))
    );
}

#[tokio::test]
async fn reports_are_read_back_and_bad_ones_listed_apart() {
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    for (n, version) in [(1, "1.0"), (2, "1.1"), (3, "1.1")] {
        let node = fleet(dir.path(), &format!("node-{n}"));
        let report = NodeReport {
            node_id: node.node_id().into(),
            installed: [("myapp".to_string(), version.to_string())].into(),
            wave_position: Some(0.1 * n as f64),
            wave: Some(n - 1),
            last_outcome: Some("installed".into()),
            last_error: (n == 1).then(|| "dpkg failed".to_string()),
            waiting: None,
            report_interval_secs: 300,
            at: crate::publish::index::whole_seconds(Utc::now()),
            agent_version: "0.1.0".into(),
            // As written: with the writing process's token.
            instance: Some(node.instance().to_string()),
            duplicate_node_id: false,
        };
        node.write_report(&report).await.unwrap();
        written.push(report);
    }
    let nodes = dir.path().join(SUITE).join("nodes");
    std::fs::write(nodes.join("liar.json"), written[0].to_json()).unwrap();
    std::fs::write(nodes.join("huge.json"), vec![b' '; 100_000]).unwrap();
    std::fs::write(nodes.join("notes.txt"), b"hello").unwrap();
    let reports = fleet(dir.path(), "operator").reports().await.unwrap();
    assert_eq!(reports.nodes, written);
    let bad: Vec<&str> = reports
        .unreadable
        .iter()
        .map(|u| u.object.as_str())
        .collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert!(bad.iter().all(|u| u.starts_with("file://")), "{bad:?}");

    let status = command::status(&fleet(dir.path(), "operator"))
        .await
        .unwrap();
    let versions: Vec<(&str, usize)> = status.packages["myapp"]
        .iter()
        .map(|v| (v.version.as_str(), v.nodes.len()))
        .collect();
    assert_eq!(versions, [("1.1", 2), ("1.0", 1)]);
    assert_eq!(status.failing.len(), 1);
    assert_eq!(status.waves.len(), 3);
    let text = status.to_text();
    assert!(text.contains("node-1"), "{text}");
}

/// A node names a halt marker after the version as the index spells it,
/// a zero epoch included; an operator types the version as they like.
/// A writer that dropped the `0:` while readers keep it would halt
/// nothing; an unhalt that compared the text would clear nothing.
#[tokio::test]
async fn a_zero_epoch_halt_is_read_back_and_unhalt_compares_by_debian_equality() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fleet(dir.path(), "node-a"), fleet(dir.path(), "node-b"));
    let operator = fleet(dir.path(), "operator");
    for version in ["0:1.1", "1.2~rc1"] {
        a.halt("myapp", version, "postinst failed").await.unwrap();
        let halt = b.halted("myapp", version).await.unwrap();
        assert_eq!(
            halt.map(|h| (h.version, h.node)),
            Some((version.to_string(), Some("node-a".to_string()))),
            "another node does not find the marker node-a wrote for myapp {version}"
        );
    }
    let mut listed: Vec<String> = operator
        .halts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.version)
        .collect();
    listed.sort();
    assert_eq!(listed, ["0:1.1", "1.2~rc1"]);

    // Other versions by Debian order, or another package: left alone.
    for other in ["1:1.1", "1.1.0", "1.2", "1.2~rc2", "1.2rc1"] {
        let removed = operator.unhalt("myapp", other).await.unwrap();
        assert!(removed.is_empty(), "unhalt {other} removed {removed:?}");
    }
    assert!(operator.unhalt("other", "1.1").await.unwrap().is_empty());
    // The same versions, typed otherwise: removed, named as stored.
    assert_eq!(operator.unhalt("myapp", "1.1").await.unwrap(), ["0:1.1"]);
    assert_eq!(b.halted("myapp", "0:1.1").await.unwrap(), None);
    assert_eq!(
        operator.unhalt("myapp", "0:1.2~rc1-0").await.unwrap(),
        ["1.2~rc1"]
    );
    assert_eq!(b.halted("myapp", "1.2~rc1").await.unwrap(), None);
    assert!(operator.halts().await.unwrap().is_empty());
}

#[tokio::test]
async fn duplicate_node_id_report_rewritten_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let a = fleet(dir.path(), "node-a");
    let b = fleet(dir.path(), "node-a").with_instance("second");
    let report = NodeReport {
        node_id: "node-a".into(),
        installed: Default::default(),
        wave_position: None,
        wave: None,
        last_outcome: None,
        last_error: None,
        waiting: None,
        report_interval_secs: 60,
        at: Utc::now(),
        agent_version: "0.1.0".into(),
        instance: None,
        duplicate_node_id: false,
    };
    let path = dir.path().join(SUITE).join("nodes").join("node-a.json");
    let on_disk = || NodeReport::parse(&std::fs::read(&path).unwrap(), "node-a").unwrap();
    // One writer: its own ETag matches every time.
    for _ in 0..3 {
        a.write_report(&report).await.unwrap();
    }
    assert_eq!(a.duplicate_seen(), None);
    assert_eq!(on_disk().instance.as_deref(), Some(a.instance()));
    // A second process with this id: its first write is unconditional (it
    // may be this node restarted), then each sees the other's rewrites.
    b.write_report(&report).await.unwrap();
    assert_eq!(b.duplicate_seen(), None);
    a.write_report(&report).await.unwrap();
    let (_, what) = a.duplicate_seen().expect("node a noticed");
    assert!(what.contains("second"), "{what}");
    assert!(on_disk().duplicate_node_id);
    assert_eq!(on_disk().instance.as_deref(), Some(a.instance()));
    b.write_report(&report).await.unwrap();
    let (_, what) = b.duplicate_seen().expect("node b noticed");
    assert!(what.contains(a.instance()), "{what}");
}
