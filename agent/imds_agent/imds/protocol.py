"""The IMDSv2 protocol's names, in one place: the token resource and the two headers that carry a token's value
and its lifetime. The emulator, the forwarder, the token cache and the policy all speak them."""

from __future__ import annotations

TOKEN_PATH = "/latest/api/token"
# The token resource as the policy sees it, normalized (version prefix and slashes removed).
TOKEN_RESOURCE = "api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
