# pulldeploy test harness: moto_server with a faithful IMDSv2 (see tests/common/moto.rs, struct Moto).
import secrets
import sys
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

from moto.server import main  # noqa: E402  (after the patch: urls.py binds the handler on import)

sys.exit(main())
