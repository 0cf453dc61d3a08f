"""imds-agent: per-process access control and IMDSv2 token injection for the EC2 metadata service."""

__version__ = "0.1.0"
