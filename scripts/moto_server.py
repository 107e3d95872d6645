# pulldeploy test harness: moto_server with a faithful IMDSv2 and atomic conditional
# writes (see tests/common/moto.rs, struct Moto).
import secrets
import sys
import threading
from urllib.parse import urlparse

from moto.instance_metadata import responses as imds

_original = imds.InstanceMetadataResponse.metadata_response
_tokens = set()
_TEXT = {"Content-Type": "text/plain"}


def metadata_response(request, full_url, headers):
    h = {k.lower(): v for k, v in dict(headers).items()}
    path = urlparse(full_url).path
    if path == "/latest/api/token":
        if request.method != "PUT":
            return 405, _TEXT, ""
        ttl = h.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return 400, _TEXT, ""
        token = secrets.token_urlsafe(32)
        _tokens.add(token)
        return 200, {**_TEXT, "X-aws-ec2-metadata-token-ttl-seconds": ttl}, token
    if h.get("x-aws-ec2-metadata-token") not in _tokens:
        return 401, _TEXT, ""
    try:
        status, _echoed_request_headers, body = _original(request, full_url, headers)
    except NotImplementedError:
        return 404, _TEXT, ""
    return status, _TEXT, body


imds.InstanceMetadataResponse.metadata_response = staticmethod(metadata_response)

# S3 applies a conditional write (If-None-Match: *, If-Match) atomically: of two
# racing writers one gets 412. moto checks the condition and then stores the
# object, in two steps, on a threaded server, so under load both racers can
# "win": a lease or the publish lock granted twice, which a test then reports
# as the agent's fault. Every object write and delete holds one lock here, as
# S3's per-key serialization would.
from moto.s3.responses import S3Response  # noqa: E402

_writes = threading.RLock()


def _atomic(method):
    def locked(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    return locked


for _name in ("put_object", "copy_object", "delete_object"):
    setattr(S3Response, _name, _atomic(getattr(S3Response, _name)))

from moto.server import main  # noqa: E402  (after the patch: urls.py binds the handler on import)

sys.exit(main())
