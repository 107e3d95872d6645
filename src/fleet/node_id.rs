//! Who this node is in the fleet: `[fleet] node_id`, else the EC2
//! instance id (IMDSv2), else `/etc/machine-id`.
//!
//! The id decides the node's wave position and names its report, so it
//! must stay the same across restarts and differ between nodes: an
//! instance id does both on EC2, a machine id elsewhere (systemd writes
//! it once, at first boot; an image that ships one makes every copy the
//! same node, so set `node_id` there).

use std::path::Path;
#[cfg(feature = "s3")]
use std::time::Duration;

use super::FleetError;

/// IMDS answers in milliseconds on EC2; off EC2 the address black-holes,
/// so one short attempt keeps a start on other hosts quick.
#[cfg(feature = "s3")]
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
#[cfg(feature = "s3")]
const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const MACHINE_ID: &str = "/etc/machine-id";

/// The node id: `configured`, else IMDS's instance-id (IMDSv2; honours
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT` and `AWS_EC2_METADATA_DISABLED`),
/// else `/etc/machine-id`, checked with [`crate::config::node_id`].
pub async fn resolve_node_id(configured: Option<&str>) -> Result<String, FleetError> {
    node_id_from(configured, None, Path::new(MACHINE_ID)).await
}

/// [`resolve_node_id`] with IMDS at `imds_endpoint` (instead of the one the
/// environment names) and the machine id read from `machine_id`.
pub async fn node_id_from(
    configured: Option<&str>,
    imds_endpoint: Option<&str>,
    machine_id: &Path,
) -> Result<String, FleetError> {
    if let Some(id) = configured {
        return crate::config::node_id(id).map_err(|reason| FleetError::Invalid { reason });
    }
    let mut tried = Vec::new();
    match instance_id(imds_endpoint).await {
        Ok(id) => match crate::config::node_id(&id) {
            Ok(id) => return Ok(id),
            Err(reason) => tried.push(format!("IMDS instance-id: {reason}")),
        },
        Err(reason) => tried.push(format!("IMDS instance-id: {reason}")),
    }
    match std::fs::read_to_string(machine_id) {
        Ok(text) => match crate::config::node_id(text.trim()) {
            Ok(id) => return Ok(id),
            Err(reason) => tried.push(format!("{}: {reason}", machine_id.display())),
        },
        Err(e) => tried.push(format!("{}: {e}", machine_id.display())),
    }
    Err(FleetError::NoNodeId { tried })
}

#[cfg(feature = "s3")]
async fn instance_id(endpoint: Option<&str>) -> Result<String, String> {
    let disabled =
        std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if disabled && endpoint.is_none() {
        return Err("disabled by AWS_EC2_METADATA_DISABLED".into());
    }
    let mut builder = aws_config::imds::Client::builder()
        .connect_timeout(IMDS_TIMEOUT)
        .read_timeout(IMDS_TIMEOUT)
        .operation_timeout(IMDS_TIMEOUT * 3)
        .max_attempts(1);
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint(endpoint).map_err(|e| e.to_string())?;
    }
    let id = builder
        .build()
        .get(INSTANCE_ID_PATH)
        .await
        .map_err(|e| crate::source::s3::one_line(&e))?;
    Ok(id.as_ref().trim().to_string())
}

#[cfg(not(feature = "s3"))]
async fn instance_id(_endpoint: Option<&str>) -> Result<String, String> {
    Err("built without AWS support".into())
}

#[cfg(all(test, feature = "s3"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An IMDSv2 stand-in: a token for a PUT with a TTL header, the
    /// instance id for a GET that carries it, one request per connection.
    async fn imds(instance_id: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                let (status, extra, body) = if text.starts_with("put /latest/api/token")
                    && text.contains("x-aws-ec2-metadata-token-ttl-seconds")
                {
                    (
                        "200 OK",
                        "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
                        "tok",
                    )
                } else if text.starts_with("get /latest/meta-data/instance-id")
                    && text.contains("x-aws-ec2-metadata-token: tok")
                {
                    ("200 OK", "", instance_id)
                } else {
                    ("401 Unauthorized", "", "")
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn configured_then_instance_id_then_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let machine_id = dir.path().join("machine-id");
        std::fs::write(&machine_id, "0123456789abcdef0123456789abcdef\n").unwrap();
        let endpoint = imds("i-0abc123def").await;

        let configured = node_id_from(Some("web-1"), Some(&endpoint), &machine_id).await;
        assert_eq!(configured.ok().as_deref(), Some("web-1"));
        let bad = node_id_from(Some("../x"), Some(&endpoint), &machine_id).await;
        assert!(matches!(bad, Err(FleetError::Invalid { .. })), "{bad:?}");

        let from_imds = node_id_from(None, Some(&endpoint), &machine_id).await;
        assert_eq!(from_imds.ok().as_deref(), Some("i-0abc123def"));

        // Nothing listens on port 9 of loopback: IMDS fails fast.
        let from_file = node_id_from(None, Some("http://127.0.0.1:9"), &machine_id).await;
        assert_eq!(
            from_file.ok().as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );

        // An IMDS answer that is no node id is not taken.
        let hostile = imds("i-0abc/../../etc").await;
        let refused = node_id_from(None, Some(&hostile), &machine_id).await;
        assert_eq!(
            refused.ok().as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );

        let none = node_id_from(None, Some("http://127.0.0.1:9"), &dir.path().join("absent")).await;
        match none {
            Err(FleetError::NoNodeId { tried }) => assert_eq!(tried.len(), 2, "{tried:?}"),
            other => panic!("{other:?}"),
        }
    }
}
