"""Braiins OS's public gRPC API (port 50051): the messages and services, and a client.

`proto/` is generated code (betterproto) from Braiins' published API definitions; see
`proto/README.md` for where they come from, their licence and how to regenerate them.
"""
