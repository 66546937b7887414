"""The HTTP gateway (CONTRACT.md, v2 "HTTP"): GA4GH TES and the REST API over the contract's requests and events,
the operator dashboard, and the index of jobs that lists read."""

SERVICE = "gateway"
