"""The gRPC API (package pdserve.v1): `generation.proto` and the code generated from it (committed; regenerate with
`python -m pdserve.proto.generate`). No logic lives here."""
