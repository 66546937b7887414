"""The contract (CONTRACT.md) as code: models, subjects, streams and buckets, declared once."""
