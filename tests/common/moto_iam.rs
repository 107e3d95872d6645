//! moto with IAM enforced: users whose policies moto checks on every S3
//! request, so a test can see a real 403 AccessDenied for what a policy
//! does not allow (a node without write access to the fleet prefix).
//!
//! moto checks nothing by default (`INITIAL_NO_AUTH_ACTION_COUNT` is
//! infinite). [`enforce_iam`] sets it to 0 through moto's
//! `POST /moto-api/reset-auth`; from then on every S3 request must be
//! SigV4-signed (moto verifies the signature) by an access key of an IAM
//! user, and is allowed only by that user's policies (explicit Deny
//! first, as IAM does). So create the bucket, the objects the test needs
//! with the fake signature of [`Moto`]'s helpers, and the users, first.
//! Observed with moto 5.2.1 and aws-sdk-s3 1.x: the SDK's signatures verify.

use std::process::Command;

use super::cmd::run;
use super::http::http_request;
use super::moto::Moto;

/// Creates IAM user `name` with the inline `policy` (a JSON policy
/// document) and returns its access key id and secret. Uses boto3 (a
/// dependency of moto) in the interpreter moto runs in.
pub fn iam_user(moto: &Moto, name: &str, policy: &str) -> (String, String) {
    const SCRIPT: &str = r#"
import sys, boto3
endpoint, name, policy = sys.argv[1], sys.argv[2], sys.argv[3]
iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
iam.create_user(UserName=name)
iam.put_user_policy(UserName=name, PolicyName=name + "-policy", PolicyDocument=policy)
key = iam.create_access_key(UserName=name)["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
    let python = std::env::var("PULLDEPLOY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = run(
        Command::new(&python)
            .args(["-c", SCRIPT, &moto.endpoint, name, policy])
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        "creating an IAM user in moto with boto3",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(id), Some(secret)) => (id.to_string(), secret.to_string()),
        _ => panic!("boto3 printed no access key: {text:?}"),
    }
}

/// From now on moto authenticates and authorizes every request.
pub fn enforce_iam(moto: &Moto) {
    let resp = http_request(moto.port, "POST", "/moto-api/reset-auth", &[], b"0");
    assert_eq!(resp.status, 200, "moto reset-auth: {}", resp.text());
}
