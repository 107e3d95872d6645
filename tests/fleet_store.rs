//! The fleet prefix on moto's S3: leases with real If-None-Match /
//! If-Match answers (412, 409), halt markers, node reports read back by
//! `pulldeploy fleet status --json`, `fleet unhalt`, and a node without
//! write access (IAM enforced by moto: a real 403) getting
//! `FleetError::Forbidden`.
//!
//! moto checks a conditional write and then writes, without a lock, so two
//! requests at the same moment can both pass (real S3 and the directory
//! store cannot). The tests here are sequential; the races (exactly one
//! winner) are unit tests on the directory store (`src/fleet/tests.rs`).

mod common {
    pub mod cmd;
    pub mod http;
    pub mod moto;
    pub mod moto_iam;
}

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::cmd::{describe_output, host_path};
use common::moto::{Moto, static_aws_env};
use common::moto_iam::{enforce_iam, iam_user};
use pulldeploy::fleet::{Fleet, FleetError, NodeReport};
use pulldeploy::publish::store::S3Store;

const BUCKET: &str = "acme-fleet";
const PREFIX: &str = "fleet";
const SUITE: &str = "production";

fn client(moto: &Moto, key: &str, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            key, secret, None, None, "tests",
        ))
        .endpoint_url(&moto.endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

fn fleet_as(moto: &Moto, node: &str, credentials: (&str, &str)) -> Fleet {
    let store = S3Store::from_client(
        BUCKET.into(),
        PREFIX.into(),
        client(moto, credentials.0, credentials.1),
    );
    Fleet::with_store(Box::new(store), SUITE, node)
}

fn fleet(moto: &Moto, node: &str) -> Fleet {
    fleet_as(moto, node, ("test", "test"))
}

fn started() -> Moto {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    moto
}

fn key(rest: &str) -> String {
    format!("{PREFIX}/{SUITE}/{rest}")
}

/// `pulldeploy fleet ARGS --fleet s3://… --suite production --endpoint …`.
fn pulldeploy_fleet(moto: &Moto, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
        .env_clear()
        .env("PATH", host_path())
        .envs(static_aws_env())
        .arg("fleet")
        .args(args)
        .args([
            "--fleet",
            &format!("s3://{BUCKET}/{PREFIX}"),
            "--suite",
            SUITE,
        ])
        .args(["--endpoint", &moto.endpoint, "--region", "us-east-1"])
        .stdin(Stdio::null())
        .output()
        .expect("running pulldeploy fleet")
}

/// A lease object as the publish lock writes it, expired a minute ago.
fn expired_lease(node: &str) -> String {
    let acquired = Utc::now() - chrono::Duration::minutes(2);
    let expires = acquired + chrono::Duration::minutes(1);
    format!(
        "Owner: {node}\nAcquired: {}\nExpires: {}\n",
        acquired.to_rfc3339(),
        expires.to_rfc3339()
    )
}

fn lease_owner(moto: &Moto, slot: u32) -> Option<String> {
    let bytes = moto.get_object(BUCKET, &key(&format!("leases/{slot}")))?;
    let text = String::from_utf8(bytes).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Owner: "))
        .map(str::to_string)
}

#[tokio::test]
async fn leases_with_s3_conditional_writes() {
    let moto = started();
    let ttl = Duration::from_secs(60);
    let (a, b, c) = (
        fleet(&moto, "node-a"),
        fleet(&moto, "node-b"),
        fleet(&moto, "node-c"),
    );

    // Two slots: a and b get one each (free slots are tried from a random
    // one on), c gets none while both are live.
    let mut lease_a = a.take_lease(2, ttl).await.unwrap().expect("a gets a slot");
    let lease_b = b.take_lease(2, ttl).await.unwrap().expect("b gets a slot");
    assert_eq!(lease_a.slot() + lease_b.slot(), 1, "slots 0 and 1");
    assert!(c.take_lease(2, ttl).await.unwrap().is_none());
    assert_eq!(
        lease_owner(&moto, lease_a.slot()).as_deref(),
        Some("node-a")
    );
    assert_eq!(
        lease_owner(&moto, lease_b.slot()).as_deref(),
        Some("node-b")
    );

    // Renew (If-Match on our ETag) moves Expires.
    let before = lease_a.expires();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(lease_a.renew(&a).await.unwrap());
    assert!(lease_a.expires() > before);

    // node-a stalls past its TTL; c breaks the expired lease (If-Match on
    // the ETag it read); a's renew and release then leave c's lease alone.
    // The expiry is faked by rewriting the object, so c is a fresh
    // process: the one above remembers a's lease live until its Expires.
    let (slot_a, slot_b) = (lease_a.slot(), lease_b.slot());
    let lease_key = |slot: u32| key(&format!("leases/{slot}"));
    moto.put_object(
        BUCKET,
        &lease_key(slot_a),
        expired_lease("node-a").as_bytes(),
    );
    let c = fleet(&moto, "node-c");
    let lease_c = c
        .take_lease(2, ttl)
        .await
        .unwrap()
        .expect("c breaks a's expired lease");
    assert_eq!(lease_c.slot(), slot_a);
    assert_eq!(lease_owner(&moto, slot_a).as_deref(), Some("node-c"));
    assert!(!lease_a.renew(&a).await.unwrap());
    assert!(!lease_a.release(&a).await.unwrap());
    assert_eq!(lease_owner(&moto, slot_a).as_deref(), Some("node-c"));

    // b restarts and takes over its own lease; c releases.
    let b_again = fleet(&moto, "node-b").take_lease(2, ttl).await.unwrap();
    assert_eq!(b_again.as_ref().map(|l| l.slot()), Some(slot_b));
    let leases = a.leases().await.unwrap();
    let mut held: Vec<(u32, Option<&str>, bool)> = leases
        .iter()
        .map(|l| (l.slot, l.holder.as_deref(), l.expired))
        .collect();
    held.sort();
    let mut expected = vec![
        (slot_a, Some("node-c"), false),
        (slot_b, Some("node-b"), false),
    ];
    expected.sort();
    assert_eq!(held, expected);
    assert!(lease_c.release(&c).await.unwrap());
    assert_eq!(moto.get_object(BUCKET, &lease_key(slot_a)), None);
    drop(lease_b);
}

#[tokio::test]
async fn halt_markers_and_fleet_unhalt() {
    let moto = started();
    let node = fleet(&moto, "node-a");
    let version = "1:2.0~rc1+b1-1";
    assert!(node.halted("myapp", version).await.unwrap().is_none());
    node.halt("myapp", version, "postinst failed")
        .await
        .unwrap();
    assert_eq!(
        moto.list_keys(BUCKET, &key("halted/")),
        [key("halted/myapp_1%3A2.0%7Erc1+b1-1")]
    );
    let halt = fleet(&moto, "node-b")
        .halted("myapp", version)
        .await
        .unwrap()
        .expect("halted");
    assert_eq!(halt.node.as_deref(), Some("node-a"));
    assert_eq!(halt.reason.as_deref(), Some("postinst failed"));
    assert!(
        node.halted("myapp", "1:2.0~rc1+b1-2")
            .await
            .unwrap()
            .is_none()
    );

    let spec = format!("myapp={version}");
    let out = pulldeploy_fleet(&moto, &["unhalt", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("unhalted myapp 1:2.0~rc1+b1-1"));
    assert!(node.halted("myapp", version).await.unwrap().is_none());
    let again = pulldeploy_fleet(&moto, &["unhalt", &spec]);
    assert_eq!(again.status.code(), Some(0), "{}", describe_output(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("was not halted"));

    // A node names the marker after the index's version, `0:1.1`; the
    // operator types `1.1`, the same version by Debian equality.
    node.halt("myapp", "0:1.1", "postinst failed")
        .await
        .unwrap();
    let out = pulldeploy_fleet(&moto, &["unhalt", "myapp=1.1"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("unhalted myapp 0:1.1 in s3://"),
        "{}",
        describe_output(&out)
    );
    assert!(node.halted("myapp", "0:1.1").await.unwrap().is_none());
    assert_eq!(
        moto.list_keys(BUCKET, &key("halted/")),
        Vec::<String>::new()
    );

    // Usage: no version, a bad name.
    for bad in ["myapp", "../x=1.0", "myapp=not a version"] {
        let out = pulldeploy_fleet(&moto, &["unhalt", bad]);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bad}: {}",
            describe_output(&out)
        );
    }
}

fn report(node: &str, version: &str, wave: usize, error: Option<&str>) -> NodeReport {
    NodeReport {
        node_id: node.into(),
        installed: [("myapp".to_string(), version.to_string())].into(),
        wave_position: Some(0.1 + wave as f64 / 10.0),
        wave: Some(wave),
        last_outcome: Some("installed".into()),
        last_error: error.map(str::to_string),
        waiting: (wave == 2).then(|| "wave until 2026-01-01T00:00:00Z".to_string()),
        report_interval_secs: 300,
        at: Utc::now(),
        agent_version: "0.1.0".into(),
        // As written: with the writing process's token.
        instance: Some(pulldeploy::fleet::instance_token().to_string()),
        duplicate_node_id: false,
    }
}

#[tokio::test]
async fn fleet_status_json_matches_what_the_nodes_wrote() {
    let moto = started();
    let mut written = vec![
        report("node-1", "1.1", 0, None),
        report("node-2", "1.1", 1, None),
        report("node-3", "1.0", 2, Some("dpkg failed\u{1b}[2J")),
    ];
    // A node that stopped reporting an hour ago.
    let mut stale = report("node-4", "1.0", 2, None);
    stale.at = Utc::now() - chrono::Duration::hours(1);
    written.push(stale);
    for report in &written {
        fleet(&moto, &report.node_id)
            .write_report(report)
            .await
            .unwrap();
    }
    // Hostile objects: another node's name, garbage, a huge one.
    moto.put_object(BUCKET, &key("nodes/liar.json"), &written[0].to_json());
    moto.put_object(BUCKET, &key("nodes/garbage.json"), b"\x00\xff{{{");
    moto.put_object(BUCKET, &key("nodes/huge.json"), &vec![b' '; 200_000]);
    let lease = fleet(&moto, "node-2")
        .take_lease(1, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(lease.is_some());
    fleet(&moto, "node-3")
        .halt("myapp", "1.2", "rolled back")
        .await
        .unwrap();

    let out = pulldeploy_fleet(&moto, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let nodes: Vec<NodeReport> =
        serde_json::from_value(status["nodes"].clone()).expect("nodes are reports");
    assert_eq!(nodes, written);
    assert_eq!(
        status["packages"]["myapp"],
        serde_json::json!([
            {"version": "1.1", "nodes": ["node-1", "node-2"]},
            {"version": "1.0", "nodes": ["node-3", "node-4"]},
        ])
    );
    let waves: Vec<(u64, usize, usize)> = status["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| {
            let count = |field: &str| w[field].as_array().map_or(0, Vec::len);
            (
                w["wave"].as_u64().unwrap_or(99),
                count("nodes"),
                count("waiting"),
            )
        })
        .collect();
    assert_eq!(waves, [(0, 1, 0), (1, 1, 0), (2, 2, 2)]);
    assert_eq!(status["failing"][0]["node_id"], "node-3");
    assert_eq!(status["stale"].as_array().map(Vec::len), Some(1));
    assert_eq!(status["stale"][0]["node_id"], "node-4");
    assert_eq!(status["halted"][0]["version"], "1.2");
    assert_eq!(status["halted"][0]["node"], "node-3");
    assert_eq!(status["leases"][0]["holder"], "node-2");
    assert_eq!(status["unreadable"].as_array().map(Vec::len), Some(3));

    // Text: the escape sequence of node-3's error is shown, not sent.
    let text = pulldeploy_fleet(&moto, &["status"]);
    assert_eq!(text.status.code(), Some(0), "{}", describe_output(&text));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(
        text.contains("node-3") && text.contains("dpkg failed\\u{1b}[2J"),
        "{text}"
    );
    assert!(text.contains("slot 0: node-2"), "{text}");
}

#[tokio::test]
async fn fleet_status_of_an_unreachable_store_is_69() {
    let out = Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
        .env_clear()
        .env("PATH", host_path())
        .envs([("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x")])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "fleet",
            "status",
            "--fleet",
            "s3://acme-fleet/fleet",
            "--suite",
            SUITE,
        ])
        .args(["--endpoint", "http://127.0.0.1:9", "--region", "us-east-1"])
        .output()
        .expect("running pulldeploy");
    assert_eq!(out.status.code(), Some(69), "{}", describe_output(&out));
    let usage = Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
        .args(["fleet", "status", "--fleet", "http://x", "--suite", SUITE])
        .output()
        .expect("running pulldeploy");
    assert_eq!(usage.status.code(), Some(64), "{}", describe_output(&usage));
}

#[tokio::test]
async fn a_node_without_write_access_gets_forbidden() {
    let moto = started();
    // Everything on the bucket, except writing the fleet prefix.
    let read_only = format!(
        r#"{{"Version":"2012-10-17","Statement":[
            {{"Effect":"Allow","Action":"s3:*","Resource":["arn:aws:s3:::{BUCKET}","arn:aws:s3:::{BUCKET}/*"]}},
            {{"Effect":"Deny","Action":["s3:PutObject","s3:DeleteObject"],"Resource":"arn:aws:s3:::{BUCKET}/{PREFIX}/*"}}]}}"#
    );
    let full = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:*","Resource":["arn:aws:s3:::{BUCKET}","arn:aws:s3:::{BUCKET}/*"]}}]}}"#
    );
    let (node_key, node_secret) = iam_user(&moto, "node", &read_only);
    let (admin_key, admin_secret) = iam_user(&moto, "admin", &full);
    enforce_iam(&moto);

    // The control: the same requests with write access work, so the 403
    // below is the policy, not a signature moto cannot verify.
    let admin = fleet_as(&moto, "node-b", (&admin_key, &admin_secret));
    admin.halt("myapp", "1.0", "rolled back").await.unwrap();
    admin
        .write_report(&report("node-b", "1.0", 0, None))
        .await
        .unwrap();
    let bogus = fleet_as(&moto, "node-x", ("AKIANOTAKEY", "nope"));
    assert!(bogus.halted("myapp", "1.0").await.is_err());

    let node = fleet_as(&moto, "node-a", (&node_key, &node_secret));
    // Reading is allowed: the node still sees halt markers.
    assert!(node.halted("myapp", "1.0").await.unwrap().is_some());
    // A lease attempt starts with a LIST of the slots. (moto 5.2 answers
    // a signed ListObjectsV2 with SignatureDoesNotMatch once IAM is on,
    // for every user, so the control above does not list; on S3 the node
    // may list and is refused the PUT.)
    let taken = node.take_lease(2, Duration::from_secs(60)).await;
    match &taken {
        Err(FleetError::Forbidden { url, .. }) => {
            assert!(
                url.starts_with(&format!("s3://{BUCKET}/{PREFIX}/{SUITE}/leases/")),
                "{url}"
            );
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
    let message = taken.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("no access to s3://"), "{message}");
    let report = report("node-a", "1.0", 0, None);
    match node.write_report(&report).await {
        Err(FleetError::Forbidden { detail, .. }) => {
            assert!(detail.contains("AccessDenied"), "{detail}")
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
    assert!(matches!(
        node.halt("myapp", "1.1", "x").await,
        Err(FleetError::Forbidden { .. })
    ));
    // Said once, however often it happens.
    let error = FleetError::Forbidden {
        url: "s3://x".into(),
        detail: "d".into(),
    };
    assert!(node.log_unavailable(&error) && node.log_unavailable(&error));
}
